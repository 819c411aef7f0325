"""Package discovery with the repository's folder mapping (see pyproject.toml for everything else).

The product's top-level folders install under ONE import package, ``gmner_pipeline``, so that we never squat generic
names such as ``pipeline`` or ``train`` in a user's environment. Every package below a mapped folder (a folder with an
``__init__.py``) is found here, so a new sub-package of ``stages/`` or ``train/`` cannot be left out of the wheel;
``tests/unit/test_architecture.py`` builds the wheel and checks it.
"""

from setuptools import find_packages, setup

FOLDERS = {
    "gmner_pipeline": "pipeline",
    "gmner_pipeline.stages": "stages",
    "gmner_pipeline.prompts": "prompts",
    "gmner_pipeline.configs": "configs",
    "gmner_pipeline.train": "train",
}


def discover() -> list[str]:
    found = []
    for package, folder in FOLDERS.items():
        found.append(package)
        found += [f"{package}.{sub}" for sub in find_packages(folder)]
    return sorted(found)


setup(package_dir=FOLDERS, packages=discover())

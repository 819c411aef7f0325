"""Architecture rules, checked: the built wheel holds every module and resource of the checkout, stage modules never
import Ray, and every registered stage meets the stage contract (docs/writing-a-stage.md)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# the repository's folders and the import package each becomes (setup.py holds the same mapping)
FOLDERS = {"pipeline": "gmner_pipeline", "stages": "gmner_pipeline/stages", "prompts": "gmner_pipeline/prompts",
           "configs": "gmner_pipeline/configs", "train": "gmner_pipeline/train"}
RESOURCES = (".py", ".txt", ".yaml", ".xml", ".md", ".onnx")


def checkout_files() -> list[str]:
    """The files git would ship (tracked, plus untracked ones it does not ignore), as repository paths."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    return [f for f in out if (REPO / f).is_file()]


def expected_in_wheel(files: list[str]) -> set[str]:
    wanted = set()
    for f in files:
        top, _, rest = f.partition("/")
        if top in FOLDERS and rest and f.endswith(RESOURCES) and "/tests/" not in f:
            wanted.add(f"{FOLDERS[top]}/{rest}")
    return wanted


def setuptools_version() -> tuple[int, ...]:
    try:
        import setuptools
    except ImportError:
        return (0,)
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a clean copy of the checkout (a build inside the checkout would reuse a stale build/)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for f in checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    # the venv's own setuptools when it is new enough (seconds, offline); else pip fetches what pyproject requires
    flags = ["--no-build-isolation"] if setuptools_version() >= (69,) else []
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *flags, "-q", "-w",
                          str(tmp / "dist"), str(src)], capture_output=True, text=True,
                         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return next((tmp / "dist").glob("gmner_pipeline-*.whl"))


def test_the_wheel_holds_every_module_and_resource(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(expected_in_wheel(checkout_files()) - names)
    assert not missing, f"not in the wheel (a package without __init__.py, or package-data?): {missing[:10]}"
    assert "gmner_pipeline/testing/fake_openai.py" in names  # the stage authors' test helpers ship
    assert not [n for n in names if "tiny_vllm" in n]  # test-only helpers do not
    assert "gmner_pipeline/stages/annotate/models/rtmdet-nano-person.onnx" in names  # the default run's detector


def test_every_module_imports_from_the_installed_layout(wheel, tmp_path):
    # Unpacked wheel first on the path, the venv's dependencies after it, and no site hooks: the editable install of
    # this checkout is invisible, so a resource found through the source tree (not the package) fails here.
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "site")
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__")
                     for n in expected_in_wheel(checkout_files()) if n.endswith(".py"))
    probe = f"""
import importlib, sys
sys.path[:0] = [{str(tmp_path / 'site')!r}]
sys.path.append({sysconfig.get_paths()['purelib']!r})
import gmner_pipeline
assert gmner_pipeline.__file__.startswith({str(tmp_path / 'site')!r}), gmner_pipeline.__file__
for name in {modules!r}:
    importlib.import_module(name)
from gmner_pipeline.config import load_config
from gmner_pipeline.prompts import load_text
assert load_config("sample").source.kind == "sample" and load_text("student/gmner.txt")
from gmner_pipeline.ingest.sample import read_sample
print("imported", len(sys.modules))
"""
    res = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def python_files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_stage_modules_never_import_ray():
    offenders = []
    for path in python_files("stages"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"stage modules import Ray (the runner wraps stages into actors): {offenders}"


def test_one_home_for_what_modules_share():
    # the strict config base (configbase), the user cache folder (paths), the box writer (answer.format_box)
    homes = {"ConfigDict(extra=": "pipeline/configbase.py", "XDG_CACHE_HOME": "pipeline/paths.py",
             'str(int(round(v))) for v in': "pipeline/answer.py", "def stable_hash": "pipeline/hashing.py"}
    for needle, home in homes.items():
        found = sorted(str(p.relative_to(REPO)) for folder in ("pipeline", "stages", "train")
                       for p in python_files(folder) if needle in p.read_text(encoding="utf-8"))
        assert found == [home], (needle, found)


def test_the_user_cache_folder_follows_xdg(monkeypatch, tmp_path):
    from gmner_pipeline.llm.config import CacheConfig
    from gmner_pipeline.paths import user_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("GMNER_LLM_CACHE", raising=False)
    assert user_cache_dir("models") == tmp_path / "gmner-pipeline" / "models"
    assert CacheConfig().resolved_path() == tmp_path / "gmner-pipeline" / "llm-cache.sqlite"


def declared(cls: type, attr: str) -> bool:
    from gmner_pipeline.stage import Stage

    return any(attr in klass.__dict__ for klass in cls.__mro__ if klass is not Stage and issubclass(klass, Stage))


def test_every_registered_stage_meets_the_contract():
    from gmner_pipeline.schema import COLUMN_GROUPS
    from gmner_pipeline.stage import Stage, StageConfig
    from gmner_pipeline.stages import STAGES, load_stage

    for key in STAGES:
        cls = load_stage(key)
        assert cls.name == key, f"{cls.__name__}.name is {cls.name!r}, registered as {key!r}"
        assert issubclass(cls.Config, StageConfig), key
        for attr in ("reads", "writes"):
            assert declared(cls, attr), f"{key} does not declare {attr}"
            value = getattr(cls, attr)
            assert isinstance(value, frozenset) and value <= set(COLUMN_GROUPS), (key, attr, value)
        own = {name for name in ("process", "aprocess") if getattr(cls, name) is not getattr(Stage, name)}
        assert len(own) == 1, f"{key} must define exactly one of process / aprocess, defines {sorted(own)}"
        for framework in ("__init__", "__call__"):
            assert getattr(cls, framework) is getattr(Stage, framework), f"{key} overrides {framework}"

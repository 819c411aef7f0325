"""Managed replicas, the parts that need no cluster: the serve config, the server command lines, the placement bundle
and the words for a bundle that cannot be placed, the role's identity and resolution, and the client finding a
replica that moved (a ``file:`` directory standing in for the run's directory actor). The replicas themselves run for
real in tests/integration/test_managed_replicas.py."""

from __future__ import annotations

import json
import threading
import time

import pytest
from pydantic import ValidationError

from gmner_pipeline.llm.client import LLMClient
from gmner_pipeline.llm.config import CircuitConfig, EndpointConfig, LLMConfig, RetryConfig, RoleConfig, ServeConfig
from gmner_pipeline.llm.directory import read_directory
from gmner_pipeline.llm.identity import role_identity, role_kind
from gmner_pipeline.llm.replicas import bundle_of, placement_problem, server_argv
from gmner_pipeline.llm.request import LLMRequest
from gmner_pipeline.llm.services import llm_services, managed_roles, resolve_roles
from gmner_pipeline.testing import FakeOpenAI

QWEN72 = {"engine": "vllm", "model": "Qwen/Qwen2.5-VL-72B-Instruct", "tensor_parallel_size": 4, "replicas": 2}


def test_a_role_has_endpoints_or_serve_or_local_never_two():
    RoleConfig(serve=QWEN72)
    with pytest.raises(ValidationError, match="set one of them"):
        RoleConfig(serve=QWEN72, endpoints=[{"base_url": "http://h:8000/v1", "model": "m"}])
    with pytest.raises(ValidationError, match="set one of them"):
        RoleConfig(serve=QWEN72, local={"base_model": "b"})
    with pytest.raises(ValidationError, match="extra"):
        RoleConfig(serve={**QWEN72, "tensor_parallel": 4})  # a typo is an error, not a silent default


def test_vllm_command_line_splits_the_model_over_the_bundles_gpus():
    serve = ServeConfig(**QWEN72, extra_args=["--max-model-len", "8192"])
    argv = server_argv(serve, 8123, python="/venv/bin/python")
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags["--model"] == "Qwen/Qwen2.5-VL-72B-Instruct"
    assert flags["--served-model-name"] == "Qwen/Qwen2.5-VL-72B-Instruct"
    assert flags["--port"] == "8123" and flags["--host"] == "0.0.0.0"
    assert flags["--tensor-parallel-size"] == "4"
    assert flags["--distributed-executor-backend"] == "mp"  # never joins the pipeline's Ray cluster for its workers
    assert argv[-2:] == ["--max-model-len", "8192"]
    own = server_argv(serve.model_copy(update={"extra_args": ["--distributed-executor-backend=ray"]}), 1)
    assert "mp" not in own  # the user's choice wins
    assert bundle_of(serve) == {"CPU": 2.0, "GPU": 4.0}


def test_llama_cpp_command_line_and_a_cpu_bundle_with_custom_resources():
    serve = ServeConfig(engine="llama_cpp", model="/models/m.gguf", served_model_name="smol", num_cpus=1,
                        resources={"llm_host": 1})
    argv = server_argv(serve, 9000, python="py")
    assert argv[:3] == ["py", "-m", "llama_cpp.server"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags["--model_alias"] == "smol" and flags["--n_threads"] == "1" and "--n_gpu_layers" not in flags
    assert bundle_of(serve) == {"CPU": 1.0, "llm_host": 1.0}  # no GPU key for 0 GPUs
    gpu = serve.model_copy(update={"num_gpus": 1})
    assert dict(zip(server_argv(gpu, 1)[3::2], server_argv(gpu, 1)[4::2]))["--n_gpu_layers"] == "-1"


def test_a_bundle_no_node_can_hold_is_explained_with_what_the_nodes_have():
    nodes = [{"Alive": True, "Resources": {"CPU": 64.0, "GPU": 4.0}},
             {"Alive": True, "Resources": {"CPU": 64.0, "GPU": 4.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    tp8 = bundle_of(ServeConfig(**{**QWEN72, "tensor_parallel_size": 8}))
    why = placement_problem(tp8, nodes)
    assert "no node of the cluster has {CPU: 2, GPU: 8}" in why and "GPU: 4" in why and "GPU: 8" not in why[40:]
    assert "tensor_parallel_size" in why
    busy = placement_problem(bundle_of(ServeConfig(**QWEN72)), nodes, {"CPU": 100.0, "GPU": 2.0})
    assert "taken" in busy and "GPU: 2" in busy


def test_a_managed_role_keeps_the_identity_of_the_same_model_listed_as_endpoints():
    managed = RoleConfig(serve=QWEN72, revision="abc")
    listed = RoleConfig(endpoints=[{"base_url": "http://h:8000/v1", "model": QWEN72["model"]}], revision="abc")
    assert role_kind(managed) == "managed"
    assert role_identity(managed) == role_identity(listed) == "Qwen/Qwen2.5-VL-72B-Instruct@abc"
    named = RoleConfig(serve={**QWEN72, "served_model_name": "teacher72"})
    assert role_identity(named) == "teacher72"


def test_resolving_a_managed_role_points_it_at_its_replicas_and_keeps_its_identity():
    config = LLMConfig(roles={"teacher": RoleConfig(serve=QWEN72, revision="abc")})
    assert managed_roles(config, {"teacher", "judge"}) == ["teacher"]
    eps = [EndpointConfig(base_url=f"http://10.0.0.{i}:8000/v1", model=QWEN72["model"]) for i in (1, 2)]
    resolved = resolve_roles(config, {"teacher"}, managed={"teacher": (eps, "ray:dir/teacher")})
    role = resolved.role("teacher")
    assert role.serve is None and [e.base_url for e in role.endpoints] == [e.base_url for e in eps]
    assert role.directory == "ray:dir/teacher"
    assert role_identity(role) == role_identity(config.role("teacher"))


def test_llm_services_refuses_managed_replicas_without_ray():
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is running in this process")
    with pytest.raises(Exception, match="need Ray"):
        with llm_services({"roles": {"teacher": {"serve": QWEN72}}}, {"teacher"}):
            pass


def test_file_directory_reads_urls_and_holes(tmp_path):
    path = tmp_path / "replicas.json"
    path.write_text(json.dumps({"endpoints": ["http://a:1/v1/", None]}))
    assert read_directory(f"file:{path}") == ["http://a:1/v1", None]
    with pytest.raises(ValueError, match="unknown replica directory"):
        read_directory("etcd:x")


def test_the_client_follows_a_replica_that_came_back_at_another_address(tmp_path):
    """Two replicas; one dies and comes back on another port. The client learns it from the directory when the dead
    endpoint is due for its probe: requests then reach the new server, and none fails."""
    a, b = FakeOpenAI(delay_s=0.01).start(), FakeOpenAI(delay_s=0.01).start()
    moved = FakeOpenAI(delay_s=0.01)
    directory = tmp_path / "replicas.json"
    directory.write_text(json.dumps([a.base_url, b.base_url]))
    role = RoleConfig(endpoints=[a.endpoint(max_concurrency=4), b.endpoint(max_concurrency=4)],
                      directory=f"file:{directory}",
                      retry=RetryConfig(initial_backoff_s=0.01, max_backoff_s=0.05, jitter_s=0.01, max_total_s=30),
                      circuit=CircuitConfig(failure_threshold=2, cooldown_s=0.2, max_cooldown_s=0.5))
    try:
        with LLMClient(role) as client:
            def move_a() -> None:
                while a.calls < 10:
                    time.sleep(0.005)
                a.stop()
                time.sleep(0.3)
                moved.start()
                directory.write_text(json.dumps([moved.base_url, b.base_url]))

            mover = threading.Thread(target=move_a)
            mover.start()
            results = client.complete_many([LLMRequest(messages=[{"role": "user", "content": f"q{i}"}])
                                            for i in range(60)])
            mover.join()
            results += client.complete_many([LLMRequest(messages=[{"role": "user", "content": f"r{i}"}])
                                             for i in range(40)])
            assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
            assert client.endpoints[0].config.base_url == moved.base_url
            assert moved.calls > 0 and client.accounting.endpoints[moved.base_url] == moved.calls
    finally:
        for srv in (a, b, moved):
            srv.stop()

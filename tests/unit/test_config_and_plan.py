import pytest

from gmner_pipeline.config import ConfigError, load_config
from gmner_pipeline.plan import plan_run, stages_for_command
from gmner_pipeline.stage import Stage


def cfg(tmp_path, *sets, path=None):
    return load_config(path, [f"run.output_dir={tmp_path / 'out'}", "pipeline=[passthrough]", *sets])


def test_defaults_validate_and_overrides_are_typed(tmp_path):
    c = cfg(tmp_path, "run.shard_size=7", "stages.passthrough.sleep_per_record=0.5")
    assert c.run.shard_size == 7
    assert c.stage_config("passthrough").sleep_per_record == 0.5
    assert c.source.kind == "sample"


@pytest.mark.parametrize("override,needle", [
    ("run.shard_sise=3", "run.shard_sise: unknown key"),
    ("stages.passthrough.sleep=1", "sleep: unknown key"),
    ("stages.passthrugh.sleep_per_record=1", "did you mean 'passthrough'"),
    ("pipeline=[tempalte_cot]", "did you mean 'template_cot'"),
    ("run.shard_size=0", "greater than or equal to 1"),
    ("source.kind=nope", "source"),
    ("source={kind: twitter_gmner, path: x, splits: [train, train]}", "a split appears twice"),
])
def test_bad_config_is_rejected_with_a_helpful_message(tmp_path, override, needle):
    with pytest.raises(ConfigError) as exc:
        cfg(tmp_path, override)
    assert needle in str(exc.value)


def test_bad_set_syntax(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        cfg(tmp_path, "run.shard_size")


def test_yaml_file_and_unknown_bundled_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  shard_size: 9\npipeline: [passthrough]\n")
    assert load_config(str(path)).run.shard_size == 9
    with pytest.raises(ConfigError, match="no bundled config"):
        load_config("no_such_config")


def test_stage_keys_change_exactly_downstream_of_a_change(tmp_path):
    plugin = "gmner_pipeline.stages.passthrough:PassthroughStage"
    base = [f"pipeline=[passthrough, '{plugin}']"]
    a = plan_run(cfg(tmp_path, *base))
    same = plan_run(cfg(tmp_path, *base))
    resources_only = plan_run(cfg(tmp_path, *base, "stages.passthrough.resources.pool_size=4"))
    assert [s.key for s in a.stages] == [s.key for s in same.stages] == [s.key for s in resources_only.stages]
    first_changed = plan_run(cfg(tmp_path, *base, "stages.passthrough.sleep_per_record=0.1"))
    assert first_changed.ingest.key == a.ingest.key
    assert all(x.key != y.key for x, y in zip(first_changed.stages, a.stages))  # it and everything after it
    shard_size = plan_run(cfg(tmp_path, *base, "run.shard_size=3"))
    assert shard_size.ingest.key != a.ingest.key
    assert a.stages[0].dir == tmp_path / "out" / "passthrough" / a.stages[0].key


def test_stages_for_command(tmp_path):
    c = cfg(tmp_path, "pipeline=[passthrough, template_cot]")
    assert stages_for_command(c, None) == ["passthrough", "template_cot"]
    assert stages_for_command(c, "passthrough") == ["passthrough"]
    assert stages_for_command(c, "retrieve") == ["retrieve"]


def test_relative_output_dir_is_planned_as_an_absolute_path(tmp_path, monkeypatch):
    # Actors on other nodes of a cluster do not share the driver's working directory: every folder handed to them
    # (stage dirs, the context's output_dir, the sample image cache) must be absolute.
    monkeypatch.chdir(tmp_path)
    plan = plan_run(load_config(None, ["run.output_dir=rel-out", "pipeline=[passthrough]"]))
    assert plan.output_dir == tmp_path / "rel-out"
    assert plan.ingest.dir.is_absolute() and plan.stages[0].dir.is_absolute()


def test_a_dangling_symlink_in_the_source_does_not_stop_the_plan(tmp_path):
    # A broken link among the images is bad input for one record ("image not found"), not a reason to refuse the run.
    from conftest import write_gmner_dataset

    data = write_gmner_dataset(tmp_path / "data", 2)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1000.jpg").symlink_to(tmp_path / "nowhere.jpg")
    c = cfg(tmp_path, "source={kind: twitter_gmner, path: " + str(data) + ", image_dir: " + str(tmp_path / "img") + "}")
    before = plan_run(c).ingest.key
    (tmp_path / "nowhere.jpg").write_bytes(b"x")  # the link now resolves: the source changed
    assert plan_run(c).ingest.key != before


def test_run_of_an_unknown_stage_is_a_config_error(tmp_path):
    # `gmner-pipeline run annotat` used to end in an UnknownStage traceback (exit 1) instead of a message (exit 2)
    c = cfg(tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'annotate'"):
        stages_for_command(c, "annotat")
    with pytest.raises(ConfigError, match="nosuch"):
        stages_for_command(c, "nosuch.mod:Stage")


class TeacherStage(Stage):
    """A stand-in LLM-driven stage (plugin path below) for the key tests."""

    name = "teacher_stage"

    @classmethod
    def llm_roles(cls, config):
        return {"teacher"}


def test_llm_stage_keys_follow_model_and_sampling_but_not_endpoints(tmp_path):
    plugin = "test_config_and_plan:TeacherStage"

    gguf = tmp_path / "model.gguf"  # the embedded server's model, so that planning fetches nothing
    gguf.write_bytes(b"GGUF one")

    def key(*sets):
        return plan_run(cfg(tmp_path, f"pipeline=[passthrough, '{plugin}']", f"llm.embedded.model_path={gguf}",
                            *sets)).stages

    ep = "llm.roles.teacher.endpoints=[{base_url: 'http://a:8000/v1', model: qwen-72b}]"
    base = key(ep)
    moved = key("llm.roles.teacher.endpoints=[{base_url: 'http://b:9000/v1', model: qwen-72b, max_concurrency: 4}]")
    new_teacher = key("llm.roles.teacher.endpoints=[{base_url: 'http://a:8000/v1', model: qwen3-vl}]")
    hotter = key(ep, "llm.roles.teacher.sampling.temperature=1.0")
    embedded = key()
    assert base[0].key == new_teacher[0].key == embedded[0].key  # passthrough calls no LLM
    assert moved[1].key == base[1].key  # other replicas of the same model: reuse
    assert len({base[1].key, new_teacher[1].key, hotter[1].key, embedded[1].key}) == 4


def test_another_embedded_gguf_or_adapter_is_another_model(tmp_path):
    # The stage key of an embedded role used to ignore llm.embedded.model_path: another GGUF reused the old outputs.
    plugin = "test_config_and_plan:TeacherStage"
    one, two = tmp_path / "one.gguf", tmp_path / "two.gguf"
    one.write_bytes(b"GGUF one")
    two.write_bytes(b"GGUF two")

    def key(*sets):
        return plan_run(cfg(tmp_path, f"pipeline=['{plugin}']", *sets)).stages[0].key

    assert key(f"llm.embedded.model_path={one}") != key(f"llm.embedded.model_path={two}")
    assert key(f"llm.embedded.model_path={one}") == key(f"llm.embedded.model_path={one}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"step 100")
    local = "llm.roles.teacher.local={base_model: tiny-qwen, adapter: " + str(adapter) + "}"
    before = key(local)
    (adapter / "adapter_model.safetensors").write_bytes(b"step 200")
    assert key(local) != before
    with pytest.raises(ConfigError, match="does not exist"):
        key("llm.roles.teacher.local={base_model: tiny-qwen, adapter: " + str(tmp_path / "none") + "}")

"""Config errors name the path the user wrote, blame the file or the --set that brought the problem, and suggest the
closest known key."""

import pytest

from gmner_pipeline.config import ConfigError, load_config


@pytest.mark.parametrize("override,line", [
    ("run.shard_sise=3", "run.shard_sise: unknown key (did you mean 'shard_size'?)"),
    ("stages.passthrough.sleep_per_recrd=1", "stages.passthrough.sleep_per_recrd: unknown key (did you mean "
                                             "'sleep_per_record'?)"),
    ("source.limitt=3", "source.limitt: unknown key (did you mean 'limit'?)"),
    ("llm.roles.teacher.sampling.temprature=1", "llm.roles.teacher.sampling.temprature: unknown key (did you mean "
                                               "'temperature'?)"),
    ("llm.roles.teacher.endpoints=[{base_url: 'http://a', model: m, weigth: 2}]",
     "llm.roles.teacher.endpoints[0].weigth: unknown key (did you mean 'weight'?)"),
    ("zzz=1", "zzz: unknown key (known here: run, source, pipeline, stages, llm, dataset"),
])
def test_unknown_key_from_set_is_blamed_on_the_set_with_its_path(tmp_path, override, line):
    with pytest.raises(ConfigError) as exc:
        load_config("sample", [f"run.output_dir={tmp_path}", "pipeline=[passthrough]", override])
    message = str(exc.value)
    assert f"invalid config (--set {override}):" in message
    assert line in message
    assert "sample.yaml" not in message  # the file is not to blame


def test_unknown_key_in_the_file_is_blamed_on_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  shard_size: 9\n  seeed: 3\npipeline: [passthrough]\nstages:\n  passthrough:\n"
                    "    resources: {num_cpu: 1}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), ["run.shard_size=4"])
    message = str(exc.value)
    assert f"invalid config ({path}):" in message
    assert "run.seeed: unknown key (did you mean 'seed'?)" in message
    assert "--set" not in message
    # a stage section's own model: the path keeps its stages.<name> prefix
    path.write_text("pipeline: [passthrough]\nstages:\n  passthrough:\n    resources: {num_cpu: 1}\n")
    with pytest.raises(ConfigError, match=r"stages\.passthrough\.resources\.num_cpu: unknown key \(did you mean "
                                          r"'num_cpus'\?\)"):
        load_config(str(path))

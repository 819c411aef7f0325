"""What a newcomer meets first: --version, shell completion, --verbose's help, `ids`, and `show` with an id that is
not there (close ids suggested, `ids` named, no quote left open)."""

import json
from importlib.metadata import version

from typer.testing import CliRunner

from gmner_pipeline.cli import app
from gmner_pipeline.schema import empty_record
from gmner_pipeline.shards import commit_shard, shard_path, write_records

cli = CliRunner()


def _output(tmp_path):
    recs = [empty_record(id=f"gmner-sample/train/{name}", source="s", text=f"tweet {name}",
                         status="dropped" if name == "rocket" else "ok",
                         drop_reason="no_consistent_chain" if name == "rocket" else None)
            for name in ("astronaut", "astronaut_birthday", "rocket", "coffee")]
    stage = tmp_path / "out" / "template_cot" / "k"
    write_records(shard_path(stage, 0), recs)
    commit_shard(stage, 0, {"records_in": 4})
    (tmp_path / "out" / "latest.json").write_text(json.dumps(
        {"run_id": "r", "chain": [{"stage": "template_cot", "key": "k", "dir": str(stage)}]}))
    return tmp_path / "out"


def test_version_completion_and_verbose_help():
    res = cli.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"gmner-pipeline {version('gmner-pipeline')}"
    top = cli.invoke(app, ["--help"])
    assert "--install-completion" in top.output and "--version" in top.output
    for command in ("ids", "card", "export", "view"):
        assert command in top.output
    run = cli.invoke(app, ["run", "--help"], terminal_width=200)
    assert "Log at DEBUG level" in run.output


def test_ids_lists_filters_and_counts(tmp_path):
    out = _output(tmp_path)
    res = cli.invoke(app, ["ids", str(out)])
    assert res.exit_code == 0
    assert res.stdout.split() == ["gmner-sample/train/astronaut", "gmner-sample/train/astronaut_birthday",
                                  "gmner-sample/train/rocket", "gmner-sample/train/coffee"]
    res = cli.invoke(app, ["ids", str(out), "--status", "dropped", "-l"])
    assert res.stdout.strip().split("\t") == ["gmner-sample/train/rocket", "dropped", "no_consistent_chain",
                                              "tweet rocket"]
    res = cli.invoke(app, ["ids", str(out), "--limit", "1"])
    assert res.stdout.split() == ["gmner-sample/train/astronaut"] and "1 of 4 ids; --limit 0 lists all" in res.output
    assert cli.invoke(app, ["ids", str(out), "--status", "nope"]).exit_code == 2
    bad_stage = cli.invoke(app, ["ids", str(out), "--stage", "distill"])
    assert bad_stage.exit_code == 2 and "stage 'distill' is not in the last run" in bad_stage.output


def test_show_with_a_missing_id_suggests_close_ids(tmp_path):
    out = _output(tmp_path)
    res = cli.invoke(app, ["show", str(out), "gmner-sample/train/astronot"])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "no record with id 'gmner-sample/train/astronot'" in text
    assert "did you mean gmner-sample/train/astronaut" in text and f"gmner-pipeline ids {out}" in text
    assert "71044" not in text  # no made-up example id
    res = cli.invoke(app, ["show", str(out), "zzz"])
    assert "ids here look like gmner-sample/train/astronaut" in " ".join(res.output.split())

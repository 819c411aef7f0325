"""The command line end to end on a real local Ray: run, status, show, view, and errors a user can act on."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import write_gmner_dataset
from gmner_pipeline.cli import app

pytestmark = pytest.mark.integration
cli = CliRunner()


@pytest.fixture
def finished_run(tmp_path, ray_local):
    data = write_gmner_dataset(tmp_path / "data", 10)
    out = tmp_path / "out"
    args = ["run", "passthrough", "--output", str(out), "--set", "source.kind=twitter_gmner",
            "--set", f"source.path={data}", "--set", "run.shard_size=4", "--set", "run.progress=false",
            "--set", "pipeline=[passthrough]"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, args


def test_run_status_show_view(finished_run):
    out, args = finished_run
    status = cli.invoke(app, ["status", str(out)])
    assert status.exit_code == 0 and "passthrough" in status.output and "3/3" in status.output
    show = cli.invoke(app, ["show", str(out), "twitter-gmner-v2/train/1000"])
    assert show.exit_code == 0 and "Alice Smith" in show.output and "[10,5,50,70]" in show.output
    assert "not visible" in show.output  # Paris has no box and grounding labels are present
    view = cli.invoke(app, ["view", str(out)])
    assert view.exit_code == 0 and "10 records" in view.output
    assert (out / "view" / "index.html").read_text().count('"status":"ok"') == 10  # every record in the index
    again = cli.invoke(app, args)  # a rerun reuses every shard
    assert again.exit_code == 0 and "reused" in again.output


def test_user_errors_are_explained(tmp_path, finished_run):
    out, _ = finished_run
    missing = cli.invoke(app, ["show", str(out), "nope"])
    assert missing.exit_code == 2 and "no record with id 'nope'" in missing.output
    bad_key = cli.invoke(app, ["run", "--set", "pipeline=[passthrough]", "--set", "run.shard_sise=3", "--output", str(tmp_path / "x")])
    assert bad_key.exit_code == 2 and "unknown key" in bad_key.output
    no_run = cli.invoke(app, ["status", str(tmp_path / "empty")])
    assert no_run.exit_code == 2 and "holds no finished run" in no_run.output

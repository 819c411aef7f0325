"""The ``gmner-pipeline`` command: run, status, show, view, teachers, stages (eval from the scoring package; train and
predict from the trainer)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .config import ConfigError, load_config
from .plan import stages_for_command
from .stage import StageSetupError
from .storage import location

app = typer.Typer(no_args_is_help=True, help="Distributed data synthesis for Grounded Multimodal NER.")
console = Console(stderr=True)
OUTPUT_HELP = ("The run's output folder: a local path, or a bucket URL (s3://bucket/prefix, gs://bucket/prefix; "
               "see docs/cluster.md).")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"gmner-pipeline {version('gmner-pipeline')}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the installed version and exit."),
) -> None:
    """Distributed data synthesis for Grounded Multimodal NER: run the pipeline, look at its output, export it."""


def _local_output(output_dir: Path, command: str) -> Path:
    """``output_dir`` for a command that reads a local output folder only; a bucket URL (which typer's Path turned
    into ``s3:/...``) stops with what to do."""
    text = str(output_dir)
    if text.startswith(("s3:/", "gs:/", "gcs:/")):
        url = text.replace(":/", "://", 1)
        _fail(f"`gmner-pipeline {command}` reads a local output folder, not a bucket; copy it first (e.g. `aws s3 "
              f"sync {url} ./out` or `gcloud storage rsync -r {url} ./out`) and give ./out. `status`, `show` and `ids` "
              "read a bucket directly")
    return output_dir


def _stdout() -> Console:
    """Tables printed to a pipe or a log get a generous width instead of the 80-column fallback."""
    out = Console()
    return out if out.is_terminal else Console(width=160)

CONFIG_HELP = "YAML config: a path, or the name of a bundled config (e.g. twitter_gmner). Default: 'sample'."
DEFAULT_CONFIG = "sample"  # the bundled sample: runs offline on a fresh machine
SET_HELP = "Override a config value, e.g. --set run.shard_size=128 --set source.path=/data/gmner (repeatable)."


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)], force=True)
    for noisy in ("ray", "filelock", "urllib3", "httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@app.command("run")
def run_command(
    target: str = typer.Argument("synthesize", help="'synthesize' runs the configured pipeline; a stage name runs the "
                                 "pipeline up to that stage (or that stage alone when it is not in the pipeline)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    set_: list[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a "
                                          "local Ray instance)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output folder (same as --set run.output_dir)."),
    executor: Optional[str] = typer.Option(None, "--executor", help="'ray' (default) or 'local': every stage in this "
                                           "process, one shard at a time (a debugger, tiny runs); run.executor."),
    redo_errors: Optional[str] = typer.Option(None, "--redo-errors", help="Errors in committed shards to redo: "
                                              "'transient' (default), 'all' or 'none'; run.redo_errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level (the stages' and the LLM "
                                 "client's details)."),
) -> None:
    """Run the pipeline (or part of it). Reruns skip every committed shard, redo damaged ones, and redo the records
    that failed for a transient reason (a dead endpoint, a timeout storm)."""
    from . import runner
    from .ingest_step import EmptySplitError
    from .preflight import check_run
    from .report import run_notes, summary_table

    _setup_logging(verbose)
    overrides = list(set_)
    if address:
        overrides.append(f"run.ray_address={address}")
    if output:
        overrides.append(f"run.output_dir={output}")
    if executor:
        overrides.append(f"run.executor={executor}")
    if redo_errors:
        overrides.append(f"run.redo_errors={redo_errors}")
    try:
        cfg = load_config(config or DEFAULT_CONFIG, overrides)
        stages = stages_for_command(cfg, None if target == "synthesize" else target)
        check_run(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    except Exception as exc:  # unknown stage etc.
        _fail(str(exc))

    progress = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("shards  {task.fields[rate]}"), TimeElapsedColumn(), console=console,
                        disable=not cfg.run.progress)
    tasks: dict[str, Any] = {}

    def on_plan(plan: Any, ingest: dict[str, Any]) -> None:
        console.print(f"ingest: {ingest['records_in']} records in {ingest['num_shards']} shards "
                      f"({ingest['records_error']} with errors) -> {plan.ingest.dir}")
        for warning in ingest.get("warnings") or []:
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True, highlight=False)
        for s in plan.stages:
            tasks[s.name] = progress.add_task(s.name, total=ingest["num_shards"], rate="")
        progress.start()

    def on_progress(state: dict[str, Any]) -> None:
        for name, sp in state.items():
            rate = f"{sp.records_per_s:,.1f} rec/s" if sp.processed_now else ""
            if sp.units_total and sp.units_done < sp.units_total:  # a keyed stage building its table first
                rate = f"table {sp.units_done}/{sp.units_total} units"
            progress.update(tasks[name], completed=sp.done, rate=rate)

    try:
        result = runner.run(cfg, stages, on_progress=on_progress, on_plan=on_plan)
    except (ConfigError, StageSetupError, runner.RunLockedError, EmptySplitError) as exc:
        progress.stop()
        _fail(str(exc))
    except OSError as exc:  # the driver's own IO (disk full, a path that is a file) and Ray's connection errors
        progress.stop()
        _fail(_os_error_message(exc, cfg))
    except KeyboardInterrupt:
        progress.stop()
        console.print("[yellow]interrupted[/yellow]: committed shards are kept; rerun the same command to resume")
        raise typer.Exit(130)
    on_progress(result.stages)
    progress.stop()
    console.print(summary_table(result))
    for note in run_notes(result):
        console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True, highlight=False)
    if result.dataset is not None:
        console.print("dataset: " + ", ".join(f"{k} {v}" for k, v in result.dataset.items())
                      + f" -> {result.plan.output_dir / 'dataset'}")
    for name, entry in result.reports.items():
        console.print(f"{name}: {entry.get('summary', '')}" + (f" -> {entry['report']}" if entry.get("report") else ""),
                      highlight=False)
    console.print(f"output: {result.plan.final_dir}")
    console.print(f"inspect: gmner-pipeline status {cfg.run.output_dir}   |   "
                  f"gmner-pipeline show {cfg.run.output_dir} <record id>")
    for warning in result.ingest.get("warnings") or []:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True, highlight=False)
    for problem in result.problems:
        console.print(f"[red]run failed:[/red] {escape(problem)}", soft_wrap=True, highlight=False)
    if result.failed:
        for stage, shard, err in result.failed:
            console.print(f"[red]failed[/red] {stage} shard {shard}: {escape(err)}", highlight=False)
        console.print("rerun the same command to retry the failed shards")
    if not result.ok:
        raise typer.Exit(1)


def _os_error_message(exc: OSError, cfg: Any) -> str:
    """One line for an OS error the driver hit, with what to do about it."""
    import errno

    if isinstance(exc, ConnectionError) and not exc.filename:  # ray.init could not join the cluster
        return (f"{exc}; check run.ray_address / --address / RAY_ADDRESS (is the cluster up?), or leave them unset "
                "for a local run")
    where = f" {exc.filename}" if exc.filename else ""
    what = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = where or f" under {cfg.run.output_dir}"
        return (f"{what} while writing{where}; free space there or choose another run.output_dir (--output). "
                "Committed shards are kept: rerun the same command to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}:{where}; choose a run.output_dir you can write (--output)"
    return f"{what}:{where}" if where else what


@app.command("status")
def status_command(output_dir: str = typer.Argument(..., help=OUTPUT_HELP)) -> None:
    """Per stage: shards done/total, records in/out, drops by reason, errors."""
    from .report import OutputNotFound, status_table

    try:
        _stdout().print(status_table(location(output_dir)))
    except OutputNotFound as exc:
        _fail(str(exc))


@app.command("show")
def show_command(
    output_dir: str = typer.Argument(..., help=OUTPUT_HELP),
    record_id: str = typer.Argument(..., help="Record id, e.g. gmner-sample/train/astronaut (`gmner-pipeline ids` "
                                    "lists them)."),
    stage: Optional[str] = typer.Option(None, help="Show the record as that stage wrote it (default: the last)."),
) -> None:
    """Print one record, readable: text, entities and boxes, every stage's results, lineage."""
    from .report import OutputNotFound, RecordNotFound, StageNotInRun, find_record, print_record

    try:
        rec = find_record(location(output_dir), record_id, stage)
    except (OutputNotFound, RecordNotFound, StageNotInRun) as exc:
        _fail(str(exc))
    print_record(rec, _stdout())


@app.command("ids")
def ids_command(
    output_dir: str = typer.Argument(..., help=OUTPUT_HELP),
    stage: Optional[str] = typer.Option(None, help="Ids as that stage wrote them (default: the last)."),
    status: Optional[str] = typer.Option(None, help="Only records with this status: ok, dropped or error."),
    limit: int = typer.Option(20, min=0, help="How many ids to print (0: all)."),
    long: bool = typer.Option(False, "--long", "-l", help="Also print each record's status, drop reason or error "
                              "stage, and its text."),
) -> None:
    """List record ids (for `gmner-pipeline show`), with their status."""
    from .report import OutputNotFound, StageNotInRun, list_ids

    try:
        rows, total = list_ids(location(output_dir), stage, status, limit or None)
    except (OutputNotFound, StageNotInRun, ValueError) as exc:
        _fail(str(exc))
    for row in rows:
        if long:
            why = row["drop_reason"] or row["error_stage"] or ""
            typer.echo(f"{row['id']}\t{row['status']}\t{why}\t{(row['text'] or '')[:80]}")
        else:
            typer.echo(row["id"])
    if total > len(rows):
        console.print(f"{len(rows)} of {total} ids; --limit 0 lists all")


@app.command("view")
def view_command(
    output_dir: Path = typer.Argument(..., help="The run's output folder."),
    html_path: Optional[Path] = typer.Option(None, "--html", help="Where to write the page (default: "
                                             "<out>/view/index.html; its files go beside it in <page>_files/)."),
    limit: int = typer.Option(0, min=0, help="Only the first N records (0: all)."),
    stage: Optional[str] = typer.Option(None, help="Show records as that stage wrote them (default: the last)."),
) -> None:
    """Write an HTML page of every record, paged and filterable (status, drop reason, chain style, teacher, GRPO
    keep/drop and drop rule), each with its image, gold and detector boxes, knowledge, chains, rewards and the policy's
    responses. Open it in a browser."""
    from .report import OutputNotFound, StageNotInRun
    from .view import write_view

    try:
        result = write_view(_local_output(output_dir, "view"), html_path, stage, limit or None)
    except (OutputNotFound, StageNotInRun) as exc:
        _fail(str(exc))
    console.print(f"wrote {result.page} ({result.records} records, {result.images} images, "
                  f"{result.bytes / 1e6:.1f} MB with its files)")


@app.command("card")
def card_command(output_dir: Path = typer.Argument(..., help="The run's output folder.")) -> None:
    """Write the dataset card again: <out>/README.md (a Hugging Face card: `datasets.load_dataset(<out>)` returns
    D1, D2 and D2_filtered) and its plots under <out>/card/, e.g. after setting card.prices in <out>/config.yaml."""
    import time

    from .card import write_card
    from .report import OutputNotFound

    t0 = time.perf_counter()
    try:
        path = write_card(_local_output(output_dir, "card"))
    except OutputNotFound as exc:
        _fail(str(exc))
    console.print(f"wrote {path} ({time.perf_counter() - t0:.1f} s)")


@app.command("export")
def export_command(
    output_dir: Path = typer.Argument(..., help="The run's output folder (its published dataset/<split>)."),
    split: str = typer.Option("D1", "--split", help="D1, D2 or D2_filtered."),
    fmt: str = typer.Option(..., "--format", "-f", help="swift (ms-swift JSONL), sharegpt (LLaMA-Factory), hf "
                            "(Parquet with embedded images) or jsonl."),
    to: Path = typer.Option(..., "--to", help="The folder to write into."),
    images: str = typer.Option("relative", "--images", help="relative | absolute | copy (into <to>/images/); hf "
                               "embeds the images."),
    frame: str = typer.Option("original", "--frame", help="The coordinate frame of every box: original (pixels), "
                              "qwen2_5_vl (pixels of the smart-resized image) or qwen2_vl (0-1000)."),
    text_only: bool = typer.Option(False, "--text-only", help="No image in the prompt (the detector's boxes and the "
                                   "knowledge go in as text)."),
    chains: str = typer.Option("all", "--chains", help="all: one example per consistent chain; first: one per "
                               "record."),
) -> None:
    """Export a published split for another trainer: the user turn from the student prompt builder, the assistant
    turn from the record's chains. Dev and test records are never exported."""
    from .export import ExportError, ExportRefused, export_split

    choices = {"--images": (images, ("relative", "absolute", "copy")), "--chains": (chains, ("all", "first")),
               "--frame": (frame, ("original", "qwen2_5_vl", "qwen2_vl"))}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            _fail(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
    try:
        stats = export_split(_local_output(output_dir, "export"), split, fmt, to, images=images,
                             frame=frame,  # type: ignore[arg-type]
                             text_only=text_only, chains=chains)  # type: ignore[arg-type]
    except (ExportError, ExportRefused) as exc:
        _fail(str(exc))
    skipped = ", ".join(f"{k} {v}" for k, v in stats.skipped.items())
    console.print(f"{split}: {stats.examples} examples from {stats.records} records -> {to}"
                  + (f" (skipped: {skipped}; first: {stats.errors[0]})" if skipped else ""))


@app.command("teachers")
def teachers_command(
    output_dir: str = typer.Argument(..., help=OUTPUT_HELP),
    stage: str = typer.Option("distill", help="The CoT stage whose folders to compare (distill or template_cot)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON instead of tables."),
) -> None:
    """Compare the CoT teacher versions in an output folder: records, chains, consistency, rejection reasons,
    tokens, seconds, and how often two teachers both wrote a consistent chain for the same record."""
    import json

    from gmner_pipeline.stages.distill.compare import compare_teachers, render

    folder = location(output_dir)
    if not folder.is_dir():
        _fail(f"{output_dir} is not a folder")
    comparison = compare_teachers(folder, stage)
    if not comparison.folders:
        _fail(f"{output_dir} holds no {stage} output; run `gmner-pipeline run {stage} --output {output_dir}` first")
    if as_json:
        typer.echo(json.dumps(comparison.to_json(), indent=1))
    else:
        _stdout().print(render(comparison))


from .scoring.cli import eval_command, grpo_report_command  # noqa: E402 - registered below, after the core commands

app.command("eval")(eval_command)
app.command("grpo-report")(grpo_report_command)

from .train.cli import predict_command, train_app  # noqa: E402 - the trainer's commands (torch etc. load lazily)

app.add_typer(train_app, name="train")
app.command("predict")(predict_command)


@app.command("stages")
def stages_command() -> None:
    """List the stages this installation knows."""
    from gmner_pipeline.stages import STAGES

    for name, target in STAGES.items():
        _stdout().print(f"{name:<14} {target}")


def main() -> None:  # pragma: no cover - console entry point alternative
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

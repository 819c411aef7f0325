"""``gmner-pipeline train sft|grpo`` and ``gmner-pipeline predict`` (registered in ``gmner_pipeline.cli``).

Only typer and rich are imported here: torch, transformers, peft and trl load inside the commands, so the CLI starts
fast and works without the ``train`` extra (the commands then say how to install it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

console = Console(stderr=True)
train_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="LoRA SFT (with GRBP) on D1 and GRPO on the filtered D2, with TRL and PEFT.")

DATA_HELP = ("Training records: a pipeline output folder, a stage folder or Parquet record shards (repeatable).")
SET_HELP = ("Override a preset value, e.g. --set trainer.learning_rate=1e-4 --set lora.r=16 --set prompt.image=false "
            "(repeatable; `trainer` holds trl.SFTConfig/GRPOConfig arguments, `lora` peft.LoraConfig ones).")
RESUME_HELP = "Resume from the last checkpoint in <output>/checkpoints ('auto') or from a checkpoint folder."


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", force=True,
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)])
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix: printed as one message, not a traceback."""
    from ..config import ConfigError
    from .collate import ChatTemplateError
    from .data import DataError
    from .models import PolicyError, TrainDependencyError
    from .predict import PredictError

    return ConfigError, DataError, PolicyError, TrainDependencyError, PredictError, ChatTemplateError


def _require_extra() -> None:
    from .models import TrainDependencyError, require_train_extra

    try:
        require_train_extra()
    except TrainDependencyError as exc:
        _fail(str(exc))


def _report(result: Any) -> None:
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun / accelerate launch, the main process reports
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    console.print(f"trained {result.steps} steps in {result.seconds:.1f} s"
                  + (f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""))
    console.print(f"data: {result.data}")
    console.print(f"adapter: {result.adapter}  (sha256 {result.identity[:16]}…)")


@train_app.command("sft")
def sft_command(
    data: List[Path] = typer.Option(..., "--data", "-d", help=DATA_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder: adapter/, checkpoints/, config, summary."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: local folder, hub name or .gguf."),
    config: str = typer.Option("mcr_sft", "--config", "-c", help="Preset (configs/train/<name>.yaml) or YAML path."),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """LoRA SFT on D1: one example per consistent chain, GRBP on the box targets, loss on the assistant turn."""
    _setup_logging(verbose)
    _require_extra()
    from .config import load_train_config
    from .sft import run_sft

    try:
        cfg = load_train_config(config, set_, **{"model.name_or_path": model})
        if cfg.kind != "sft":
            _fail(f"preset {config!r} is a {cfg.kind} config; `train sft` needs an sft one (e.g. mcr_sft)")
        result = run_sft(cfg, data, output, resume)
    except _user_errors() as exc:
        _fail(str(exc))
    _report(result)


@train_app.command("grpo")
def grpo_command(
    data: List[Path] = typer.Option(..., "--data", "-d", help="The filtered D2: " + DATA_HELP),
    adapter: Path = typer.Option(..., "--adapter", "-a", help="The SFT output (or adapter folder) to start from."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder: adapter/, checkpoints/, config, summary."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's)."),
    config: str = typer.Option("mcr_grpo", "--config", "-c", help="Preset (configs/train/<name>.yaml) or YAML path."),
    set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help=RESUME_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """GRPO (MCR's CVO) from the SFT adapter, rewarded by the project's verifiable reward."""
    _setup_logging(verbose)
    _require_extra()
    from .config import load_train_config
    from .grpo import run_grpo

    try:
        cfg = load_train_config(config, set_, **{"model.name_or_path": model})
        if cfg.kind != "grpo":
            _fail(f"preset {config!r} is a {cfg.kind} config; `train grpo` needs a grpo one (e.g. mcr_grpo)")
        result = run_grpo(cfg, data, adapter, output, resume)
    except _user_errors() as exc:
        _fail(str(exc))
    _report(result)


def predict_command(
    data: List[Path] = typer.Option(..., "--data", "-d", help="Twitter-GMNER folder (txt/ + xml/), pipeline output "
                                    "folder, stage folder or Parquet record shards (repeatable)."),
    out: Path = typer.Option(Path("preds.jsonl"), "--out", "-o", help="JSONL predictions for `gmner-pipeline eval`."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="A `train` output or adapter folder."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's)."),
    split: Optional[str] = typer.Option(None, "--split", help="Source split: the file of a Twitter-GMNER folder "
                                        "(default test), or a filter on the records of shards."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Predict on the first N records only."),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="Images of a Twitter-GMNER folder."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generate call."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    set_: List[str] = typer.Option([], "--set", "-s", help="Student prompt settings, e.g. --set prompt.knowledge=never "
                                   "(default: those the adapter was trained with)."),
    allow_gold_knowledge: bool = typer.Option(False, "--allow-gold-knowledge", help="Predict on dev/test records "
                                              "whose prompt includes knowledge built from their gold entities."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Generate answers with a policy and write them, boxes in original pixels, for `gmner-pipeline eval`."""
    _setup_logging(verbose)
    _require_extra()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..config import ConfigError, parse_override
    from .models import read_policy_info
    from .predict import load_records, predict
    from .sampler import LocalPolicySampler

    try:
        prompt: dict[str, Any] = dict((read_policy_info(adapter) if adapter else {}).get("prompt") or {})
        for item in set_:
            path, value = parse_override(item)
            if path[0] != "prompt" or len(path) < 2:
                raise ConfigError(f"--set {item!r}: predict only takes prompt.<field>=value")
            node = prompt
            for part in path[1:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        records = load_records(data, split, limit, image_dir)
        if not records:
            _fail("no record to predict on (check --data and --split)")
        sampler = LocalPolicySampler(model, str(adapter) if adapter else None, device=device, prompt=prompt or None,
                                     batch_size=batch_size)
        with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task("predict", total=len(records))
            result = predict(sampler, records, out, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             allow_gold_knowledge=allow_gold_knowledge,
                             progress=lambda n: bar.advance(task, n))
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"wrote {result.written} predictions to {result.out} in {result.seconds:.1f} s; parse status "
                  f"{result.status} (parse rate {100 * result.parse_rate:.1f}%)")
    if result.errors:
        console.print(f"[yellow]{len(result.errors)} records had no usable prompt[/yellow], first: {result.errors[0]}")
    console.print(f"score it: gmner-pipeline eval --gold <gold> --pred {result.out}")

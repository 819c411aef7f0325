"""``gmner-pipeline eval``: score predictions against gold, print a table, write JSON.

Registered in the main CLI with ``app.command("eval")(eval_command)``; ``grpo_report_command`` (the reward statistics
of a grpo-filter output, with other thresholds if wanted) with ``app.command("grpo-report")(grpo_report_command)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List

import typer
from rich.console import Console
from rich.table import Table

from ..answer import DEFAULT_TYPES
from .config import EvalConfig, GrpoFilterConfig
from .evaluate import EvalReport, evaluate
from .grpo_stats import RULES, filter_report, plot_histograms, stats_from_records
from .io import EvalInputError, load_gold, load_predictions, pair, parquet_files, read_records


def eval_command(
    gold: List[Path] = typer.Option(..., "--gold", "-g", help="Twitter-GMNER folder (txt/ + xml/), or Parquet record "
                                    "shards / folders of shards (repeatable)."),
    pred: List[Path] = typer.Option(..., "--pred", "-p", help="Predictions: JSONL ({'id', 'answer'} or {'id', "
                                    "'triples'} per line; see docs/scoring.md) or Parquet record shards (repeatable)."),
    split: str = typer.Option("test", "--split", help="Split to read from a Twitter-GMNER folder."),
    out: Path = typer.Option(Path("eval.json"), "--out", "-o", help="Where to write the JSON report."),
    iou_threshold: float = typer.Option(0.5, "--iou", help="IoU threshold for a correct box."),
    strict_iou: bool = typer.Option(False, "--strict-iou", help="IoU > threshold (H-Index) instead of >=."),
    pred_boxes: str = typer.Option("all", "--pred-boxes", help="Several predicted boxes: all | any | first must hit."),
    ignore_spaces: bool = typer.Option(False, "--ignore-spaces", help="Compare entity texts without whitespace."),
    case_insensitive: bool = typer.Option(False, "--case-insensitive", help="Compare entity texts ignoring case."),
    n_require_type: bool = typer.Option(False, "--n-require-type", help="N-Pre/N-Rec also require the type."),
    occurrence: str = typer.Option("tokens", "--occurrence", help="N-Count: 'tokens' (contiguous token run) or "
                                   "'substring' (spaceless substring)."),
    pred_field: str = typer.Option("entities", "--pred-field", help="Parquet predictions: 'entities' or 'cot' "
                                   "(the first chain's answer)."),
    missing: str = typer.Option("empty", "--missing", help="Gold record without prediction: 'empty' (scored as "
                                "predicting nothing, and counted) or 'error'."),
    types: str = typer.Option(",".join(DEFAULT_TYPES), "--types", help="The label set answers are read with "
                              "(comma-separated; the rewards' default too). Other types the gold has are added."),
) -> None:
    """Score predictions against gold: GMNER / MNER / EEG P-R-F1, per type, textual and visual bias, grounding."""
    console = Console()
    try:
        config = EvalConfig(iou_threshold=iou_threshold, strict_iou=strict_iou, pred_boxes=pred_boxes,
                            ignore_spaces=ignore_spaces, case_sensitive=not case_insensitive,
                            n_metrics_require_type=n_require_type, occurrence=occurrence,
                            types=tuple(t.strip() for t in types.split(",") if t.strip()))
        if pred_field not in ("entities", "cot") or missing not in ("empty", "error"):
            raise EvalInputError("--pred-field must be 'entities' or 'cot'; --missing must be 'empty' or 'error'")
        gold_records = load_gold(gold, split)
        extra = sorted({e["type"] for r in gold_records for e in r.get("entities") or []} - set(config.types))
        if extra:
            console.print(f"[yellow]the gold has types outside the label set {list(config.types)}: {extra}[/yellow] "
                          "(added; give training the same set: RewardConfig(types=...))")
        preds = load_predictions(pred, pred_field, [*config.types, *extra])  # type: ignore[arg-type]
        pairing = pair(gold_records, preds, missing)  # type: ignore[arg-type]
        if pairing.samples and len(pairing.missing) == len(pairing.samples):
            raise EvalInputError(no_match_message(pairing, len(preds.by_id), split))
    except (EvalInputError, ValueError, FileNotFoundError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)

    report = evaluate(pairing.samples, config)
    result = report.to_dict() | {
        "inputs": {"gold": [str(p) for p in gold], "pred": [str(p) for p in pred], "split": split},
        "missing_predictions": len(pairing.missing), "missing_examples": pairing.missing[:10],
        "unknown_prediction_ids": len(pairing.unknown), "unknown_examples": pairing.unknown[:10],
        "skipped_gold_records": pairing.skipped_gold,
        "prediction_problems": preds.problems[:50], "prediction_problem_count": len(preds.problems),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(report_table(report))
    console.print(per_type_table(report))
    for key, value in result["rules"].items():
        console.print(f"[dim]{key}: {value}[/dim]")
    if pairing.missing:
        console.print(f"[yellow]{len(pairing.missing)} gold records had no prediction[/yellow] (scored as empty)")
    if pairing.unknown:
        console.print(f"[yellow]{len(pairing.unknown)} predictions match no gold record[/yellow] (ignored)")
    if preds.problems:
        console.print(f"[yellow]{len(preds.problems)} prediction problems[/yellow], first: {preds.problems[0]}")
    console.print(f"report: {out}")


def no_match_message(pairing: Any, predictions: int, split: str) -> str:
    """Why a run where no prediction pairs with a gold record is an error, with ids of both sides to compare."""
    gold = pairing.missing[:2]
    if not predictions:
        return (f"no predictions were read, so none of the {len(pairing.samples)} gold records is scored; check "
                "--pred (JSONL lines need an 'id')")
    return (f"none of the {predictions} predictions matches one of the {len(pairing.samples)} gold records (gold "
            f"ids look like {gold}, prediction ids like {pairing.unknown[:2]}): predict the same split (--split "
            f"{split}) and keep the record ids or the sample keys (IMGIDs)")


def report_table(report: EvalReport) -> Table:
    d = report.to_dict()
    table = Table(title=f"GMNER evaluation ({d['samples']} sentences)")
    for col in ("metric", "P", "R", "F1", "correct", "predicted", "gold"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name in ("gmner", "mner", "eeg"):
        m = d[name]
        table.add_row(name.upper(), *_pct(m["precision"], m["recall"], m["f1"]),
                      str(m["correct"]), str(m["predicted"]), str(m["gold"]))
    tb = d["textual_bias"]
    table.add_row("N (location None)", *_pct(tb["n_pre"], tb["n_rec"], tb["n_f1"]), str(tb["n_correct"]),
                  str(tb["n_predicted"]), str(tb["n_gold"]))
    vb, gr = d["visual_bias"], d["grounding"]
    accs = ", ".join(f"Acc@{k[4:]} {100 * v:.2f}" for k, v in gr.items() if k.startswith("acc@"))
    table.caption = (f"visual bias: N-Count {vb['n_count']}, N-Rate {100 * vb['n_rate']:.2f}% of {vb['checked']} "
                     f"predicted | grounding over {gr['groundable_gold']} groundable gold: {accs}, "
                     f"mean IoU {gr['mean_iou']:.4f}")
    status = ", ".join(f"{k} {v}" for k, v in d["parse_status"].items())
    table.caption += f" | parse status: {status}"
    return table


def per_type_table(report: EvalReport) -> Table:
    d = report.to_dict()
    table = Table(title="per type (GMNER | MNER F1)")
    for col in ("type", "P", "R", "F1", "MNER F1", "gold"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for t, m in d["gmner"]["per_type"].items():
        mner = d["mner"]["per_type"].get(t, {"f1": 0.0})
        table.add_row(t, *_pct(m["precision"], m["recall"], m["f1"]), f"{100 * mner['f1']:.2f}", str(m["gold"]))
    return table


def _pct(*values: float) -> list[str]:
    return [f"{100 * v:.2f}" for v in values]



def grpo_report_command(
    shards: List[Path] = typer.Argument(..., help="Record shards with a grpo column (files, folders, or a run's "
                                        "output folder)."),
    out: Path = typer.Option(Path("grpo-report"), "--out", "-o", help="Folder for grpo_report.json and grpo.png."),
    min_std: float = typer.Option(0.1, help="Keep iff std >= this."),
    min_max: float = typer.Option(0.8, help="Keep iff max >= this."),
    median_low: float = typer.Option(0.08, help="Keep iff median >= this."),
    median_high: float = typer.Option(0.6, help="Keep iff median <= this."),
    std: str = typer.Option("population", help="population | sample standard deviation."),
) -> None:
    """GRPO filter statistics: kept / dropped by rule, histograms of mean, std, max and median (JSON + PNG)."""
    console = Console()
    try:
        config = GrpoFilterConfig(min_std=min_std, min_max=min_max, median_low=median_low, median_high=median_high,
                                  std=std)
        stats = stats_from_records(read_records(parquet_files(shards)), config)
    except (EvalInputError, ValueError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    if not stats:
        Console(stderr=True).print("[red]error:[/red] no record has a grpo column: run the grpo-filter stage first")
        raise typer.Exit(2)
    report = filter_report(stats, config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_histograms(report, out / "grpo.png", config)
    table = Table(title=f"GRPO filter: kept {report['kept']} of {report['items']} "
                        f"({100 * report['kept_fraction']:.1f}%)")
    for col in ("rule", "drops when", "dropped (first rule)", "fails it"):
        table.add_column(col, justify="right" if col[0] in "df" and col != "drops when" else "left")
    for rule in ("too_few_rewards", *RULES):
        table.add_row(rule, report["rules"][rule], str(report["dropped_by_first_rule"][rule]),
                      str(report["failing_each_rule"][rule]))
    console.print(table)
    for name, h in report["histograms"].items():
        q = h["summary"]
        if q["median"] is not None:
            console.print(f"{name:>6}: min {q['min']:.3f}  p25 {q['p25']:.3f}  median {q['median']:.3f}  "
                          f"p75 {q['p75']:.3f}  max {q['max']:.3f}")
    console.print(f"report: {out / 'grpo_report.json'}, plot: {out / 'grpo.png'}")

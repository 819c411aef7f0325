"""The dataset card's plots: PNG files under ``<output>/card/``, each drawn only when its data exists.

Drawn with matplotlib's Agg backend, with its bundled DejaVu font, a fixed size and dpi, and the PNG's ``Software``
tag removed, so that the same facts give the same bytes (matplotlib's Agg PNGs carry no date).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

PLOT_DIR = "card"
BLUE, LIGHT, GREEN, RED, GREY = "#2E5A9C", "#A1B8D8", "#3B8E4F", "#C44E52", "#888888"
STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
         "svg.hashsalt": "gmner", "path.simplify": True}


def _bar(ax: Any, labels: list[str], values: list[float], color: str = BLUE, horizontal: bool = False) -> None:
    if horizontal:
        ax.barh(range(len(labels)), values, color=color)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
    else:
        ax.bar(range(len(labels)), values, color=color)
        ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels), default=0) > 6 else 0,
                      ha="right" if max(map(len, labels), default=0) > 6 else "center")


def entity_types(facts: dict[str, Any], fig: Any) -> str | None:
    types = facts["entity_types"]
    if not types:
        return None
    fine = facts["fine_types"]
    axes = fig.subplots(1, 2 if fine else 1, squeeze=False)[0]
    _bar(axes[0], list(types), list(types.values()))
    axes[0].set_title("entities per type")
    if fine:
        top = sorted(fine.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
        _bar(axes[1], [k for k, _ in top], [v for _, v in top], color=LIGHT, horizontal=True)
        axes[1].set_title("fine types (top 20)")
    return "Entity types"


def boxes(facts: dict[str, Any], fig: Any) -> str | None:
    per = facts["boxes_per_entity"]
    if not facts["grounded_entities"]:
        return None
    ax = fig.subplots()
    labels = ["0", "1", "2", "3+"]
    _bar(ax, [f"{k} box" if k == "1" else f"{k} boxes" for k in labels], [per.get(k, 0) for k in labels])
    share = facts["visible_entities"] / facts["grounded_entities"]
    ax.set_title(f"gold boxes per entity ({100 * share:.1f}% of {facts['grounded_entities']} entities visible)")
    ax.set_ylabel("entities")
    return "Boxes per entity"


def detector_labels(facts: dict[str, Any], fig: Any) -> str | None:
    labels = facts["detector_labels"]
    if not labels:
        return None
    top = list(labels.items())[:25]
    fig.set_size_inches(7, 1.3 + 0.3 * len(top))
    ax = fig.subplots()
    _bar(ax, [k for k, _ in top], [v for _, v in top], color=LIGHT, horizontal=True)
    ax.set_title(f"detector labels (top {len(top)}; {facts['records_with_detections']} records with detections)")
    ax.set_xlabel("boxes")
    return "Detector labels"


def chain_consistency(facts: dict[str, Any], fig: Any) -> str | None:
    rows = facts["chains"]
    if not rows:
        return None
    fig.set_size_inches(8, 1.3 + 0.4 * len(rows))
    ax = fig.subplots()
    labels = [f"{r['style']} / {r['teacher']}" for r in rows]
    total = [r["chains"] for r in rows]
    ok = [r["consistent"] for r in rows]
    ax.barh(range(len(rows)), total, height=0.6, color=LIGHT, label="chains")
    ax.barh(range(len(rows)), ok, height=0.6, color=GREEN, label="consistent with gold")
    for i, (t, k) in enumerate(zip(total, ok)):
        ax.text(t, i, f" {100 * k / t:.0f}%" if t else "", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("chains")
    ax.set_xlim(0, max(total) * 1.1)  # room for the share beside the longest bar
    ax.set_title("chain consistency by style / teacher")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # beside, never over a bar
    return "Chain consistency"


def rewards(facts: dict[str, Any], fig: Any) -> str | None:
    stats = facts["group_stats"]
    if not facts["rewards"] and not stats:
        return None
    names = [n for n in ("mean", "std", "max", "median") if n in stats]
    axes = fig.subplots(1, 1 + len(names), squeeze=False)[0]
    bins = [i / 20 for i in range(21)]
    axes[0].hist(facts["rewards"], bins=bins, color=BLUE)
    axes[0].set_title(f"rewards ({len(facts['rewards'])} responses)")
    bounds = facts["filter_thresholds"]
    lines = {"std": ["min_std"], "max": ["min_max"], "median": ["median_low", "median_high"]}
    kept = facts.get("kept_stats") or {}
    for ax, name in zip(axes[1:], names):
        ax.hist(stats[name], bins=bins, color=LIGHT, label="all groups")
        if kept.get(name):
            ax.hist(kept[name], bins=bins, color=GREEN, label="kept")
        for key in lines.get(name, []):
            if key in bounds:
                ax.axvline(bounds[key], color=RED, linestyle="--", linewidth=1.2)
        ax.set_title(f"group {name}")
    axes[0].set_ylabel("count")
    if kept and names:
        axes[1].legend(loc="upper right", fontsize=8)
    return "GRPO rewards and filter statistics"


def tokens(facts: dict[str, Any], fig: Any) -> str | None:
    rows = [s for s in facts["stages"] if s.get("prompt_tokens") or s.get("completion_tokens")]
    if not rows:
        return None
    fig.set_size_inches(8, 1.3 + 0.4 * len(rows))
    ax = fig.subplots()
    names = [s["stage"] for s in rows]
    p = [s["prompt_tokens"] for s in rows]
    c = [s["completion_tokens"] for s in rows]
    ax.barh(range(len(rows)), p, height=0.6, color=LIGHT, label="prompt")
    ax.barh(range(len(rows)), c, left=p, height=0.6, color=BLUE, label="completion")
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel("tokens (as the records' lineage accounts them)")
    ax.set_title("tokens per stage")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return "Tokens per stage"


PLOTS: dict[str, tuple[Callable[[dict[str, Any], Any], str | None], tuple[float, float]]] = {
    "entity_types": (entity_types, (9, 3.2)),
    "boxes_per_entity": (boxes, (6, 3.2)),
    "detector_labels": (detector_labels, (7, 4)),
    "chain_consistency": (chain_consistency, (8, 3.4)),
    "rewards": (rewards, (14, 3)),
    "tokens_per_stage": (tokens, (8, 2.8)),
}


def draw_plots(facts: dict[str, Any], output_dir: str | Path) -> list[tuple[str, str]]:
    """Draw every plot whose data exists into ``<output>/card/NAME.png``; returns ``(title, relative path)`` in a
    fixed order. Plots of an earlier run that has no data now are removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(output_dir) / PLOT_DIR
    drawn = []
    for name, (draw, size) in PLOTS.items():
        path = folder / f"{name}.png"
        with plt.rc_context(STYLE):
            fig = plt.figure(figsize=size, dpi=100, layout="constrained")
            try:
                title = draw(facts, fig) if facts.get("plots", True) else None
                if title is None:
                    path.unlink(missing_ok=True)
                    continue
                buf = io.BytesIO()
                fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
            finally:
                plt.close(fig)
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        drawn.append((title, f"{PLOT_DIR}/{name}.png"))
    return drawn

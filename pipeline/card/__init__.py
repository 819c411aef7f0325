"""The dataset card of an output folder: ``<output>/README.md`` (a Hugging Face card whose header maps the published
splits, so ``datasets.load_dataset("<output>")`` returns D1, D2 and D2_filtered) and its plots under ``<output>/card/``.

``facts`` gathers what the card says from the folder (deterministic: the same run gives the same card on any
machine), ``plots`` draws the PNGs, ``render`` writes the text. Every complete run writes the card
(``runner.run``); ``gmner-pipeline card <output>`` writes it again, e.g. after adding prices to the config.
"""

from __future__ import annotations

from pathlib import Path

from .config import CardConfig, Price  # the run config imports this: the rest loads when a card is written

CARD_FILE = "README.md"

__all__ = ["CARD_FILE", "CardConfig", "Price", "build_card", "write_card"]


def build_card(output_dir: str | Path) -> tuple[str, list[tuple[str, str]]]:
    """The card's text, after drawing its plots (returns the text and the plots' titles and relative paths)."""
    from .facts import collect
    from .plots import draw_plots
    from .render import render_card

    facts = collect(output_dir)
    plots = draw_plots(facts, output_dir)
    return render_card(facts, plots), plots


def write_card(output_dir: str | Path) -> Path:
    """Write ``<output>/README.md`` (and the plots beside it) for the last run in ``output_dir``."""
    from ..atomic import write_bytes_atomic

    text, _ = build_card(output_dir)
    path = Path(output_dir) / CARD_FILE
    write_bytes_atomic(path, text.encode("utf-8"))
    return path

"""The dataset card and the view on a finished run: how long the card takes, how large the view is, and how quickly
the page answers in headless Chromium (load, a text search over every record, the next page).

    python benchmarks/card_view.py OUTPUT_DIR [--rounds 3]

OUTPUT_DIR is a finished run, e.g. the Twitter-GMNER train run:
    GMNER_DATA=... gmner-pipeline run synthesize --config twitter_gmner --output /tmp/tg
Needs Debian's chromium (/usr/bin/chromium) and playwright (the dev extra) for the browser part.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from gmner_pipeline.card import write_card
from gmner_pipeline.view import write_view

FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def timed(fn, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, times


def browse(page_path: Path, query: str, rounds: int) -> dict[str, list[float]]:
    from playwright.sync_api import sync_playwright

    out: dict[str, list[float]] = {"load": [], "search": [], "next page": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        for _ in range(rounds):
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            for name, action in (("load", lambda: page.goto(page_path.resolve().as_uri())),
                                 ("search", lambda: page.locator("#f-search").fill(query)),
                                 ("next page", lambda: page.locator(".next").first.click())):
                t0 = time.perf_counter()
                action()
                page.wait_for_selector("#records[data-state=ready]")
                out[name].append(time.perf_counter() - t0)
            assert not errors, errors
            page.close()
        browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--query", default="Trump", help="what the search box is given")
    args = ap.parse_args()
    _, card_times = timed(lambda: write_card(args.output), args.rounds)
    view, view_times = timed(lambda: write_view(args.output), args.rounds)
    index_mb = view.page.stat().st_size / 1e6
    print(f"card: {statistics.median(card_times):.2f} s median ({min(card_times):.2f}-{max(card_times):.2f}) over "
          f"{args.rounds} rounds")
    print(f"view: {view.records} records, {view.images} images; {view.bytes / 1e6:.1f} MB in all (page with the "
          f"index {index_mb:.1f} MB); written in {statistics.median(view_times):.2f} s median "
          f"({min(view_times):.2f}-{max(view_times):.2f})")
    for name, times in browse(view.page, args.query, args.rounds).items():
        print(f"chromium {name}: {statistics.median(times):.2f} s median ({min(times):.2f}-{max(times):.2f})")


if __name__ == "__main__":
    main()

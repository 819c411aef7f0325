"""``gmner-pipeline view`` in a real headless Chromium (Debian's package, driven by Playwright): the page loads
without console errors, images decode, boxes sit where the record says, filters and paging work, on a hand-built
output with every column group (knowledge, several styles and teachers, GRPO) and on a real run of the CLI.

The browser fixture installs Debian's ``chromium`` when it is absent (``apt-get``, as root) and skips, saying why,
only when that cannot be done. A screenshot of each page is kept under its output folder (``view/screenshot*.png``);
both outlive the test under ``test-artefacts/`` in the checkout (or ``$GMNER_TEST_ARTEFACTS``): the real run's whole
output folder, the hand-built output's screenshot.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gmner_pipeline.schema import empty_record
from gmner_pipeline.shards import commit_shard, shard_path, write_records
from gmner_pipeline.view import write_view

pytestmark = pytest.mark.integration

# Where the screenshots outlive the test's temporary folder: the real run's whole output folder (page, screenshot,
# card) is written here, and the hand-built output's screenshot copied (ignored by git).
ARTEFACTS = Path(os.environ.get("GMNER_TEST_ARTEFACTS") or Path(__file__).resolve().parents[2] / "test-artefacts")


def artefact_dir(name: str) -> Path:
    folder = ARTEFACTS / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]
GREEN = (0, 160, 0)


def _install_chromium() -> str | None:
    """Debian's chromium, installed when absent (root and apt-get needed); None with the reason in the skip."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
            return None
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    """One Chromium for this module. Not for the session: Playwright's sync API keeps an event loop running in the
    main thread while it is open, and later tests that call asyncio.run would fail."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed")
    path = _install_chromium()
    if path is None:
        pytest.skip("Debian's chromium is not installed and could not be installed (needs root, apt-get and the "
                    "Debian registry): apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _open(browser, page_path: Path, viewport=(1400, 1600)):
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
    context.set_default_timeout(120_000)  # a shared 2-core machine under load can be slow to paint
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(page_path.resolve().as_uri())
    page.wait_for_selector("#records[data-state=ready]")
    return page, problems


def _ready(page):
    page.wait_for_selector("#records[data-state=ready]")


def _images_decoded(page) -> int:
    imgs = page.locator("#records img")
    for i in range(imgs.count()):
        imgs.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=imgs.nth(i).element_handle())
    return imgs.count()


def _check_box_geometry(page, record_id: str, box: list[float], size: tuple[int, int]) -> None:
    """The gold box's element sits on the image where the box's pixels are, and its border is green on screen."""
    card = page.locator(f"article[data-id='{record_id}']")
    card.scroll_into_view_if_needed()
    img = card.locator(".frame img").bounding_box()
    el = card.locator(".box.gold").first.bounding_box()
    sx, sy = img["width"] / size[0], img["height"] / size[1]
    expected = (img["x"] + box[0] * sx, img["y"] + box[1] * sy, (box[2] - box[0]) * sx, (box[3] - box[1]) * sy)
    got = (el["x"], el["y"], el["width"], el["height"])
    assert all(abs(a - b) <= 1.5 for a, b in zip(got, expected)), (got, expected)
    shot = Image.open(io.BytesIO(card.locator(".frame").screenshot())).convert("RGB")
    frame = card.locator(".frame").bounding_box()
    x = int(el["x"] - frame["x"] + 1)  # inside the left border, halfway down
    y = int(el["y"] - frame["y"] + el["height"] / 2)
    pixel = shot.getpixel((x, y))
    assert all(abs(a - b) <= 40 for a, b in zip(pixel, GREEN)), pixel


# --- a hand-built output with every column group -----------------------------------------------------------------

def _records(images: Path) -> list[dict]:
    out = []
    for i in range(60):
        w, h = (400, 300) if i % 2 else (300, 400)
        img = images / f"{i}.png"
        Image.new("RGB", (w, h), (200, 200, 255 - i)).save(img)
        status = "ok" if i % 10 else "dropped"
        box = [w * 0.25, h * 0.2, w * 0.75, h * 0.6]
        chains = [{"style": "template", "route": "entity_first", "model_id": None, "think": "t", "answer": "a",
                   "consistent": True}]
        if i % 3 == 0:
            chains.append({"style": "llm", "route": "question_answer", "model_id": "qwen-72b", "think": "x " * 20,
                           "answer": "Alice|PER|None", "consistent": False, "rejection": "wrong_answer"})
        grpo = None
        if i % 4 == 1:
            grpo = {"policy_id": "policy@1", "responses": ["r1", "r2"], "rewards": [0.2, 0.9], "mean": 0.55,
                    "std": 0.35, "max": 0.9, "median": 0.55, "keep": i % 8 == 1, "reason": None if i % 8 == 1
                    else "median_above"}
        rec = empty_record(
            id=f"v/train/{i:03d}", source="v", split="train", text=f"Alice visits Paris number {i}",
            tokens=["Alice", "visits", "Paris"], grounding_labels="present",
            image={"path": str(img) if i != 7 else str(images / "missing.png"), "width": w, "height": h},
            entities=[{"text": "Alice", "start": 0, "end": 1, "type": "PER", "fine_type": "athlete", "boxes": [box]},
                      {"text": "Paris", "start": 2, "end": 3, "type": "LOC", "fine_type": None, "boxes": []}],
            detections={"model_id": "rtmdet", "backend": "onnxruntime", "annotation_text": "person",
                        "boxes": [{"label": "person", "score": 0.9, "box": [10, 10, 100, 120]},
                                  {"label": "bad", "score": 0.1, "box": [50, 50, 10, 10]}]},  # inverted: skipped
            knowledge=[{"entity": "Alice", "type": "PER", "fine_type": "athlete", "knowledge": "a tall runner",
                        "answers": [{"model_id": "m1", "text": "runner"}], "voted": "tall; runner",
                        "cache_key": "k"}],
            cot={"chains": chains, "split": "D1" if i % 2 else "D2", "skipped": None}, grpo=grpo,
            status=status, drop_reason=None if status == "ok" else "no_consistent_chain")
        out.append(rec)
    return out


@pytest.fixture
def built_output(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "images").mkdir()
    recs = _records(tmp_path / "images")
    stage = out / "grpo_filter" / "k1"
    for n in range(3):
        part = recs[n * 20:(n + 1) * 20]
        write_records(shard_path(stage, n), part)
        commit_shard(stage, n, {"records_in": 20, "records_ok": sum(r["status"] == "ok" for r in part),
                                "records_dropped": sum(r["status"] == "dropped" for r in part),
                                "drop_reasons": {"no_consistent_chain": sum(r["status"] == "dropped" for r in part)}})
    (out / "latest.json").write_text(json.dumps({"run_id": "r", "chain": [{"stage": "grpo_filter", "key": "k1",
                                                                          "dir": str(stage)}]}))
    return out, recs


def test_view_of_every_column_group_filters_and_pages(built_output, browser):
    out, recs = built_output
    result = write_view(out, chunk_size=16)  # several chunks: paging loads them on demand
    assert result.records == 60 and result.images == 59  # one image is missing on disk
    page, problems = _open(browser, result.page)
    info = page.locator(".pageinfo").first
    assert info.inner_text() == "records 1–25 of 60 (page 1 of 3)"
    assert page.locator("article.rec").count() == 25
    assert _images_decoded(page) == 24  # record 7 has no image: a placeholder of its size instead
    placeholder = page.locator("article[data-id='v/train/007'] .noimg")
    assert "image not on disk: missing.png" in placeholder.inner_text()
    rec = recs[3]
    _check_box_geometry(page, rec["id"], rec["entities"][0]["boxes"][0], (rec["image"]["width"],
                                                                          rec["image"]["height"]))
    # the detector's inverted box is not drawn, the good one is
    assert page.locator(f"article[data-id='{rec['id']}'] .box.det").count() == 1
    # knowledge, chains with verdicts, rewards
    card = page.locator("article[data-id='v/train/009']")
    assert "a tall runner" in card.inner_text()
    assert card.locator("details.chain").count() == 2
    assert "rejected" in card.locator("details.chain").nth(1).inner_text()
    assert "wrong_answer" in card.locator("details.chain").nth(1).inner_text()
    grpo_card = page.locator("article[data-id='v/train/001']")
    assert grpo_card.locator(".rewards .reward").count() == 2 and "kept" in grpo_card.locator(".grpo").inner_text()
    grpo_card.locator("details.responses summary").click()  # every response beside its reward
    assert grpo_card.locator(".response").nth(1).inner_text().split() == ["0.90", "r2"]
    assert "dropped: median_above" in page.locator("article[data-id='v/train/005'] .grpo").inner_text()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(out / "view" / "screenshot-built.png"))
    kept = artefact_dir("view-built")
    kept.mkdir()
    shutil.copy(out / "view" / "screenshot-built.png", kept / "screenshot-built.png")

    def choose(name: str, value: str) -> None:
        select = page.locator(f"#f-{name}")
        label = next(o for o in select.locator("option").all_inner_texts() if o.startswith(value + " ("))
        select.select_option(label=label)
        _ready(page)

    choose("status", "dropped")
    cards = page.locator("article.rec")
    assert cards.count() == 6
    assert all(t.startswith("dropped") for t in cards.locator("h3 .badge").all_inner_texts())
    assert info.inner_text() == "records 1–6 of 6 (page 1 of 1)"
    choose("status", "ok")
    choose("style", "llm")
    expected = [r["id"] for r in recs if r["status"] == "ok" and any(c["style"] == "llm" for c in r["cot"]["chains"])]
    assert page.locator("article.rec").evaluate_all("els => els.map(e => e.dataset.id)") == expected
    choose("teacher", "qwen-72b")
    assert page.locator("article.rec").count() == len(expected)
    page.locator("#f-style").select_option(index=0)
    page.locator("#f-teacher").select_option(index=0)
    _ready(page)
    choose("grpo", "dropped")
    dropped = [r["id"] for r in recs if r["status"] == "ok" and r["grpo"] and not r["grpo"]["keep"]]
    assert page.locator("article.rec").evaluate_all("els => els.map(e => e.dataset.id)") == dropped
    page.locator("#f-grpo").select_option(index=0)
    choose("grpo_reason", "median_above")
    assert page.locator("article.rec").evaluate_all("els => els.map(e => e.dataset.id)") == dropped
    page.locator("#f-grpo_reason").select_option(index=0)
    page.locator("#f-search").fill("number 42")
    _ready(page)
    assert page.locator("article.rec").evaluate_all("els => els.map(e => e.dataset.id)") == ["v/train/042"]
    page.locator("#f-search").fill("")
    page.locator("#f-status").select_option(index=0)
    _ready(page)
    page.locator(".next").first.click()
    _ready(page)
    assert info.inner_text() == "records 26–50 of 60 (page 2 of 3)"
    assert page.locator("article.rec").first.get_attribute("data-id") == "v/train/025"
    page.locator(".next").first.click()
    _ready(page)
    assert page.locator("article.rec").count() == 10 and page.locator(".next").first.is_disabled()
    assert problems == []


def test_view_of_a_real_cli_run(tmp_path, browser):
    """`run synthesize` through the CLI in its own process (a fresh local Ray, whose token-auth notice must not be
    printed) on the bundled sample with the default config's packaged detector and template chains, then `view`,
    then the page: real photos, gold and detector boxes where the records put them, the dataset card linked. The LLM
    stages of the default graph are left out here (minutes with the embedded server on 2 cores; test_embedded_default
    runs them, and the hand-built output above shows their columns in the page). The output folder is kept
    (``test-artefacts/view-cli-run``, or ``$GMNER_TEST_ARTEFACTS``) with the page and its screenshot
    ``view/screenshot.png``."""
    from gmner_pipeline.latest import load_latest
    from gmner_pipeline.report import find_record
    from gmner_pipeline.shards import iter_committed_records

    out = artefact_dir("view-cli-run")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    sets = ["run.progress=false", "pipeline=[annotate, template_cot]"]
    run = subprocess.run([sys.executable, "-m", "gmner_pipeline.cli", "run", "synthesize", "--output", str(out),
                          *[x for item in sets for x in ("--set", item)]], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Token authentication is enabled" not in run.stderr + run.stdout
    assert (out / "README.md").is_file()  # the dataset card
    view = subprocess.run([sys.executable, "-m", "gmner_pipeline.cli", "view", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert view.returncode == 0, view.stderr[-3000:]
    records = list(iter_committed_records(load_latest(out)["final_dir"]))
    page, problems = _open(browser, out / "view" / "index.html")
    assert page.locator("article.rec").count() == len(records) == 10
    assert page.locator("header .links a").first.get_attribute("href") == "../README.md"  # the dataset card
    # filters that cannot narrow this run (no GRPO, no drops) are hidden; those that can are shown
    assert page.locator("#f-grpo").is_hidden() and page.locator("#f-reason").is_hidden()
    assert page.locator("#f-dsplit").is_visible()
    assert _images_decoded(page) == 10
    rid = "gmner-sample/train/astronaut"
    rec = find_record(out, rid)
    ent = next(e for e in rec["entities"] if e["boxes"])
    _check_box_geometry(page, rid, ent["boxes"][0], (rec["image"]["width"], rec["image"]["height"]))
    for r in records:  # every detector box the record holds is drawn (the packaged detector finds people)
        boxes = [b for b in r["detections"]["boxes"] if b["box"][2] >= b["box"][0] and b["box"][3] >= b["box"][1]]
        assert page.locator(f"article[data-id='{r['id']}'] .box.det").count() == len(boxes)
    assert page.locator(f"article[data-id='{rid}'] .box.det").count() > 0
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(out / "view" / "screenshot.png"))
    assert problems == []

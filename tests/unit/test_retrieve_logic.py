"""Pure logic of the retrieve stage: query building, length filter, selection/threshold with injected embeddings,
search, response parsing, image checks, config validation. No model, no network."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from gmner_pipeline.schema import empty_record, records_to_table
from gmner_pipeline.stage import StageContext
from gmner_pipeline.stages.retrieve import RetrieveConfig, RetrieveStage
from gmner_pipeline.stages.retrieve.corpus import top_k
from gmner_pipeline.stages.retrieve.images import UnreadableImage, open_checked, sniff_format
from gmner_pipeline.stages.retrieve.query import build_query, load_template, too_long
from gmner_pipeline.stages.retrieve.select import cosine_scores, decide
from gmner_pipeline.stages.retrieve.sources import Candidate, CandidateSet, ImageSource
from gmner_pipeline.stages.retrieve.web import SearchError, dig, extract_urls


def rec(tokens, entities=(), **kw):
    ents = [{"text": " ".join(tokens[s:e]), "start": s, "end": e, "type": t, "fine_type": None, "boxes": []}
            for s, e, t in entities]
    return empty_record(id=kw.pop("id", "r"), source="t", text=" ".join(tokens), tokens=list(tokens),
                        entities=ents, grounding_labels="absent", **kw)


# --- query and filter -------------------------------------------------------------------------------------------------

def test_query_is_sentence_plus_its_entities_once_in_order():
    r = rec("Messi and Messi beat Real Madrid".split(), [(4, 6, "ORG"), (0, 1, "PER"), (2, 3, "PER")])
    assert build_query(r, load_template("retrieve/query.txt")) == "Messi and Messi beat Real Madrid Messi, Real Madrid"
    assert build_query(rec(["hello"]), "{text} {entities}") == "hello"
    assert build_query(r, "{entities} | {text}", " / ") == "Messi / Real Madrid | Messi and Messi beat Real Madrid"


def test_template_with_unknown_fields_is_refused(tmp_path, monkeypatch):
    import gmner_pipeline.prompts as prompts

    (tmp_path / "bad.txt").write_text("{text} {caption}")
    monkeypatch.setattr(prompts, "PROMPTS_DIR", tmp_path)
    prompts.load_text.cache_clear()
    try:
        with pytest.raises(ValueError, match="only {text} and {entities}"):
            load_template("bad.txt")
    finally:
        prompts.load_text.cache_clear()


def test_length_filter():
    assert not too_long(rec(["w"] * 26), 26)
    assert too_long(rec(["w"] * 27), 26)
    assert not too_long(rec(["w"] * 27), None)


# --- selection --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scores, failures, alpha, expected", [
    ([], [], 0.3, (None, None, "no_candidates")),
    ([0.2, 0.35, 0.31], [None] * 3, 0.3, (1, 0.35, None)),
    ([0.3], [None], 0.3, (0, 0.3, None)),  # alpha is inclusive
    ([0.29, 0.1], [None, None], 0.3, (None, 0.29, "below_alpha")),
    ([None, 0.5, 0.5], ["download_failed", None, None], 0.3, (1, 0.5, None)),  # ties keep the higher-ranked one
    ([None, float("nan")], ["download_failed", "unreadable_image"], 0.3, (None, None, "download_failed")),
    ([None], ["unreadable_image"], 0.3, (None, None, "unreadable_image")),
])
def test_decide(scores, failures, alpha, expected):
    d = decide(scores, failures, alpha)
    assert (d.chosen, d.best_score, d.drop_reason) == expected


def test_cosine_scores_normalise_and_keep_nan_rows():
    images = np.array([[2.0, 0.0], [1.0, 1.0], [np.nan, np.nan]])
    s = cosine_scores(np.array([3.0, 0.0]), images)
    assert s[0] == pytest.approx(1.0) and s[1] == pytest.approx(2 ** -0.5) and np.isnan(s[2])


def test_top_k_is_exact_and_sorted():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(300, 16)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    q = m[:7] + 0.01
    scores, idx = top_k(m, q, 5)
    brute = np.argsort(-(q @ m.T), axis=1)[:, :5]
    assert np.array_equal(idx, brute) and np.all(np.diff(scores, axis=1) <= 0)
    assert top_k(m[:3], q, 5)[1].shape == (7, 3)
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatIP(16)
    index.add(m)
    f_scores, f_idx = top_k(m, q, 5, index)
    assert np.array_equal(f_idx, idx) and np.allclose(f_scores, scores, atol=1e-5)


# --- search responses and image checks --------------------------------------------------------------------------------

def test_extract_urls_follows_paths_and_skips_junk():
    payload = {"data": {"items": [{"img": {"src": "https://a/1.jpg"}}, {"img": {"src": "ftp://x"}}, {"img": None},
                                  {"img": {"src": "https://a/1.jpg"}}, {"img": {"src": "http://b/2.png"}}]}}
    assert extract_urls(payload, "data.items", "img.src", 5) == ["https://a/1.jpg", "http://b/2.png"]
    assert extract_urls(payload, "data.items", "img.src", 1) == ["https://a/1.jpg"]
    assert dig({"a": [{"b": 1}]}, "a.0.b") == 1 and dig({"a": []}, "a.3") is None
    with pytest.raises(SearchError, match="results_path"):
        extract_urls({"other": []}, "results", "url", 5)


def _encode(fmt, size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format=fmt)
    return buf.getvalue()


def test_image_checks():
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP"):
        data = _encode(fmt)
        assert sniff_format(data) == fmt
        _, info = open_checked(data, 1000)
        assert (info.format, info.width, info.height) == (fmt, 8, 6)
    assert sniff_format(b"<html>") is None
    with pytest.raises(UnreadableImage, match="exceeds max_pixels"):
        open_checked(_encode("PNG", (40, 40)), 1000)
    with pytest.raises(UnreadableImage, match="cannot decode"):
        open_checked(_encode("PNG")[:40], 1000)
    # a TIFF is a real image, but not a format we accept (no decoder is ever reached for it)
    with pytest.raises(UnreadableImage, match="not a JPEG"):
        open_checked(_encode("TIFF"), 1000)


# --- config ------------------------------------------------------------------------------------------------------------

def test_config_is_strict_and_typed():
    cfg = RetrieveConfig.model_validate({"source": {"kind": "web_api", "endpoint": "https://x/search"}})
    assert cfg.source.kind == "web_api" and cfg.alpha == 0.3 and cfg.top_k == 5 and cfg.max_tokens == 26
    with pytest.raises(ValidationError, match="path"):
        RetrieveConfig.model_validate({"source": {"kind": "local_corpus"}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        RetrieveConfig.model_validate({"source": {"kind": "local_corpus", "path": "x", "endpoint": "y"}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        RetrieveConfig.model_validate({"aplha": 0.2})
    with pytest.raises(ValidationError, match="empty"):
        RetrieveConfig.model_validate({"clip": {"pretrained": " "}})


# --- the stage's batch logic with injected embeddings -------------------------------------------------------------------

class FakeEncoder:
    """Text i of a batch embeds along axis ``hash(text) % 4``; images carry whatever embedding the test gives."""

    model_id = "fake-clip"

    def __init__(self, vectors):
        self.vectors = vectors

    def encode_texts(self, texts):
        return np.stack([self.vectors(t) for t in texts]).astype(np.float32)


class FakeSource(ImageSource):
    kind = "fake"

    def __init__(self, answers):
        self.answers = answers
        self.queries = []

    def candidates(self, queries, query_embeddings):
        self.queries += queries
        return [self.answers[q.split()[0]] for q in queries]


def unit(*xs):
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def make_stage(answers, **cfg):
    stage = RetrieveStage(RetrieveConfig.model_validate(
        {"source": {"kind": "local_corpus", "path": "unused"}, **cfg}), StageContext(run_id="r1"))
    stage.attach(FakeEncoder(lambda t: unit(1, 0, 0)), FakeSource(answers))
    return stage


def test_stage_keeps_top1_at_alpha_and_counts_every_drop_reason():
    cand = lambda uri, vec=None, failure=None: Candidate(uri=uri, path=f"/img/{uri}", sha256=uri * 2, width=4,  # noqa: E731
                                                        height=3, embedding=vec, failure=failure, message=failure)
    answers = {
        "keep": CandidateSet([cand("a", unit(0, 1, 0)), cand("b", unit(1, 1, 0)), cand("c", failure="download_failed")]),
        "low": CandidateSet([cand("d", unit(1, 3, 0))]),  # cos = 0.316... then alpha 0.35 drops it
        "none": CandidateSet([]),
        "dead": CandidateSet([cand("e", failure="download_failed"), cand("f", failure="unreadable_image")]),
        "bad": CandidateSet([cand("g", failure="unreadable_image")]),
        "err": CandidateSet(error="image search failed: HTTP 500"),
    }
    stage = make_stage(answers, alpha=0.35)
    records = [rec([w, "x"], [(0, 1, "PER")], id=w) for w in answers]
    records.append(rec(["long"] * 30, id="long"))
    records.append(rec(["keep"], id="passed-dropped", status="dropped", drop_reason="earlier"))
    records.append(rec(["keep"], id="has-image", image={"path": "/p", "uri": None, "sha256": None, "width": 1,
                                                         "height": 1}))
    out = stage(records)
    assert [r["id"] for r in out] == [r["id"] for r in records]
    by_id = {r["id"]: r for r in out}

    kept = by_id["keep"]
    assert kept["status"] == "ok" and kept["image"] == {"path": "/img/b", "uri": "b", "sha256": "bb", "width": 4,
                                                       "height": 3}
    assert [c["score"] for c in kept["retrieval"]["candidates"]] == [pytest.approx(0.0, abs=1e-6),
                                                                   pytest.approx(2 ** -0.5), None]
    assert kept["retrieval"]["chosen_score"] == pytest.approx(2 ** -0.5) and kept["retrieval"]["query"] == "keep x keep"
    assert kept["grounding_labels"] == "absent" and kept["entities"][0]["type"] == "PER"
    assert by_id["low"]["drop_reason"] == "below_alpha" and "0.3162 < alpha=0.35" in by_id["low"]["error"]
    assert by_id["low"]["retrieval"]["chosen_score"] == pytest.approx(10 ** -0.5)
    assert [by_id[i]["drop_reason"] for i in ("none", "dead", "bad", "long")] == [
        "no_candidates", "download_failed", "unreadable_image", "too_long"]
    assert by_id["err"]["status"] == "error" and by_id["err"]["error_stage"] == "retrieve"
    assert stage.counts == {"kept": 1, "below_alpha": 1, "no_candidates": 1, "download_failed": 1,
                            "unreadable_image": 1, "too_long": 1, "error": 1}
    for untouched in ("passed-dropped", "has-image"):
        assert by_id[untouched]["retrieval"] is None and by_id[untouched]["lineage"] == []
    assert by_id["keep"]["lineage"][0]["model_ids"] == ["fake-clip"] and by_id["long"]["lineage"][0]["run_id"] == "r1"
    records_to_table(out)  # everything fits the schema


def test_score_text_sentence_or_query():
    def vectors(text):
        return unit(1, 0) if text == "Paris in spring Paris" else unit(0, 1)  # the query, not the sentence

    answers = {"Paris": CandidateSet([Candidate(uri="a", embedding=unit(1, 0))])}
    for mode, expected in (("sentence", 0.0), ("query", 1.0)):
        stage = make_stage(answers, alpha=-1, score_text=mode)
        stage.encoder = FakeEncoder(vectors)
        r = stage([rec(["Paris", "in", "spring"], [(0, 1, "LOC")])])[0]
        assert r["retrieval"]["chosen_score"] == pytest.approx(expected, abs=1e-6)


def test_stage_key_covers_the_query_template_text(tmp_path, monkeypatch):
    # Editing the query template changes every query, so a rerun must not reuse the old retrievals.
    import gmner_pipeline.prompts as prompts
    from gmner_pipeline.stages.retrieve.config import RetrieveConfig

    monkeypatch.setattr(prompts, "PROMPTS_DIR", tmp_path)
    config = RetrieveConfig(query_template="q.txt")
    try:
        (tmp_path / "q.txt").write_text("{text}")
        prompts.load_text.cache_clear()
        before = config.key_payload()
        (tmp_path / "q.txt").write_text("{text} {entities}")
        prompts.load_text.cache_clear()
        assert config.key_payload() != before
    finally:
        prompts.load_text.cache_clear()

"""The retrieve stage (VKEL stage 1): text-only sentence -> query -> candidate images -> CLIP cosine -> keep top-1 if
it reaches alpha. Records that already carry an image pass through unchanged."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from gmner_pipeline.paths import user_cache_dir
from gmner_pipeline.prompts import prompt_hash
from gmner_pipeline.schema import GROUNDING_ABSENT
from gmner_pipeline.stage import Record, Stage, StageSetupError, mark_dropped, mark_error
from gmner_pipeline.storage import is_remote

from .clip_model import ClipEncoder, check_weights
from .config import RetrieveConfig
from .images import open_checked, to_rgb
from .query import build_query, load_template, record_text, sentence_length, too_long
from .select import TOO_LONG, UNREADABLE_IMAGE, decide
from .sources import SOURCES, Candidate, CandidateSet, ImageSource

log = logging.getLogger(__name__)


def default_store_dir(cfg: RetrieveConfig, output_dir: str) -> Path:
    if cfg.download.store_dir:
        return Path(cfg.download.store_dir).expanduser()
    if output_dir and not is_remote(output_dir):
        return Path(output_dir) / "images"
    # later stages open the chosen images by path: with the output in a bucket they stay on this node's disk
    return user_cache_dir("images")


class RetrieveStage(Stage):
    name = "retrieve"
    version = "1"
    Config = RetrieveConfig
    reads = frozenset()  # the sample's text and entities
    writes = frozenset({"retrieval", "image"})

    config: RetrieveConfig

    @classmethod
    def preflight(cls, config: RetrieveConfig) -> None:  # type: ignore[override]
        if config.source is None:
            raise StageSetupError(
                "stages.retrieve.source is not set: give a local corpus (kind: local_corpus, path: <folder, .parquet, "
                ".tar or .txt list>) or a web search API (kind: web_api, endpoint: <url>); see docs/retrieve.md"
            )
        try:
            load_template(config.query_template)
        except (FileNotFoundError, ValueError) as exc:
            raise StageSetupError(f"stages.retrieve.query_template: {exc}") from None
        try:
            SOURCES[config.source.kind].preflight(config)
        except (FileNotFoundError, ValueError) as exc:
            raise StageSetupError(str(exc)) from None
        check_weights(config.clip)

    def setup(self) -> None:
        cfg = self.config
        if cfg.source is None:
            self.preflight(cfg)
        encoder = ClipEncoder(cfg.clip)
        source = SOURCES[cfg.source.kind](cfg, encoder, default_store_dir(cfg, self.context.output_dir))
        source.setup()
        self.attach(encoder, source)

    def attach(self, encoder: Any, source: ImageSource) -> None:
        """Use this encoder and source (``setup`` builds them from the config; tests and benchmarks inject theirs)."""
        self.template = load_template(self.config.query_template)
        self.prompt_hash = prompt_hash(self.config.query_template)
        self.model_ids = [encoder.model_id]
        self.encoder = encoder
        self.source = source
        self.counts: Counter[str] = Counter()

    def close(self) -> None:
        if hasattr(self, "source"):
            self.source.close()
            self.encoder.close()
            log.info("retrieve: %s", dict(self.counts))

    # --- one batch ----------------------------------------------------------------------------------------------------

    def accepts(self, record: Record) -> bool:
        return not record.get("image")  # records that already carry an image pass through unchanged

    def process(self, records: list[Record]) -> list[Record]:
        cfg = self.config
        work: list[Record] = []
        for rec in records:
            if too_long(rec, cfg.max_tokens):
                mark_dropped(rec, self.name, TOO_LONG, f"{sentence_length(rec)} tokens > max_tokens={cfg.max_tokens}")
                self.counts[TOO_LONG] += 1
            else:
                work.append(rec)
        if work:
            self._retrieve(work)
        return records

    def _retrieve(self, work: list[Record]) -> None:
        cfg = self.config
        queries = [build_query(rec, self.template, cfg.entity_separator) for rec in work]
        score_texts = queries if cfg.score_text == "query" else [record_text(rec) for rec in work]
        # Embed each distinct text once; query embeddings only when the source searches by them.
        needed = (queries if self.source.needs_query_embeddings else []) + score_texts
        unique = list(dict.fromkeys(needed))
        text_emb = self.encoder.encode_texts(unique)
        row = {text: i for i, text in enumerate(unique)}
        query_emb = text_emb[[row[q] for q in queries]] if self.source.needs_query_embeddings else None
        score_emb = text_emb[[row[s] for s in score_texts]]

        sets = self.source.candidates(queries, query_emb)
        self._embed_missing(sets)
        for rec, query, semb, cset in zip(work, queries, score_emb, sets, strict=True):
            self._finish(rec, query, semb, cset)

    def _embed_missing(self, sets: list[CandidateSet]) -> None:
        """Embed downloaded candidates (sources without precomputed embeddings) in batches across the whole batch."""
        todo: list[Candidate] = [c for s in sets for c in s.candidates
                                 if c.embedding is None and c.failure is None and c.path]
        if not todo:
            return
        max_pixels = self.config.download.max_pixels

        def load(cand: Candidate):
            img, _ = open_checked(Path(cand.path).read_bytes(), max_pixels)  # type: ignore[arg-type]
            return to_rgb(img), None

        encoded = self.encoder.encode_images(todo, load)
        for cand, emb, err in zip(todo, encoded.embeddings, encoded.errors, strict=True):
            if err is None:
                cand.embedding = emb
            else:
                cand.failure, cand.message = UNREADABLE_IMAGE, err

    def _finish(self, rec: Record, query: str, score_emb: np.ndarray, cset: CandidateSet) -> None:
        cfg = self.config
        retrieval: dict[str, Any] = {"query": query, "source": cfg.source.kind, "candidates": [],  # type: ignore[union-attr]
                                     "chosen_score": None, "alpha": cfg.alpha, "model_id": self.encoder.model_id}
        rec["retrieval"] = retrieval
        if cset.error:
            mark_error(rec, self.name, cset.error, transient=cset.transient)
            self.counts["error"] += 1
            return
        scores: list[float | None] = [
            float(np.dot(c.embedding, score_emb)) if c.embedding is not None and c.failure is None else None
            for c in cset.candidates
        ]
        retrieval["candidates"] = [{"uri": c.uri, "sha256": c.sha256, "score": s}
                                   for c, s in zip(cset.candidates, scores, strict=True)]
        decision = decide(scores, [c.failure for c in cset.candidates], cfg.alpha)
        retrieval["chosen_score"] = decision.best_score
        if decision.drop_reason is not None:
            mark_dropped(rec, self.name, decision.drop_reason, self._drop_message(decision, cset))
            self.counts[decision.drop_reason] += 1
            return
        chosen = cset.candidates[decision.chosen]  # type: ignore[index]
        rec["image"] = {"path": chosen.path, "uri": chosen.uri, "sha256": chosen.sha256,
                        "width": chosen.width, "height": chosen.height}
        # Boxes of a retrieved image are unknown: later stages must not read empty box lists as "not visible".
        rec["grounding_labels"] = GROUNDING_ABSENT
        self.counts["kept"] += 1

    def _drop_message(self, decision: Any, cset: CandidateSet) -> str:
        if decision.best_score is not None:
            return f"best CLIP cosine {decision.best_score:.4f} < alpha={self.config.alpha}"
        if not cset.candidates:
            return "the image source returned no candidates"
        failures = "; ".join(f"{c.uri}: {c.message}" for c in cset.candidates if c.message)
        return f"every candidate failed: {failures}"[:2000]

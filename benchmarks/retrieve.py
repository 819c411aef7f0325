"""Retrieve stage throughput: images/s through CLIP scoring, against a raw open_clip encode loop, in one run.

Both paths see the same image files, in the same order, with the same model object and batch size:

* raw: ``PIL.Image.open(path).convert("RGB")`` -> open_clip preprocess -> ``model.encode_image`` -> L2 normalise;
* stage: ``RetrieveStage.__call__`` on text-only records (Twitter-GMNER tweets of <= 26 words) whose source yields
  those files as candidates, ``--candidates`` per record: sentence text encoding, byte/magic/pixel checks, decode,
  preprocess, image encoding, cosine, top-1/alpha selection. Its text encoding is work the raw loop does not do;
* image path: the stage's image side alone (checked load, preprocess, encode), as run when a corpus is indexed.

The model has random weights built offline (same cost as trained ones; no pretrained weights exist on the build
machines); it is saved once under .cache/retrieve/ and loaded through the stage's real local-checkpoint path.

    python benchmarks/retrieve.py                       # ViT-B-32, the photos in ../shared/images, batch 32
    python benchmarks/retrieve.py --images DIR --n 640 --batch-size 64 --rounds 5 --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch
from PIL import Image

from gmner_pipeline.schema import empty_record
from gmner_pipeline.stages.retrieve import RetrieveConfig, RetrieveStage
from gmner_pipeline.stages.retrieve.clip_model import ClipEncoder
from gmner_pipeline.stages.retrieve.sources import Candidate, CandidateSet, ImageSource

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.retrieve")


class FileCandidates(ImageSource):
    """Hands out the benchmark's files as candidates, ``k`` per query, in a fixed order."""

    kind = "files"

    def __init__(self, paths: list[Path], k: int):
        self.paths, self.k, self.pos = paths, k, 0

    def candidates(self, queries, query_embeddings):
        out = []
        for _ in queries:
            chunk = self.paths[self.pos:self.pos + self.k]
            self.pos += self.k
            out.append(CandidateSet([Candidate(uri=str(p), path=str(p)) for p in chunk]))
        return out


def random_checkpoint(model: str) -> Path:
    path = REPO / ".cache" / "retrieve" / f"bench-{model}-random-seed0.pt"
    if not path.is_file():
        torch.manual_seed(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(open_clip.create_model(model, pretrained=None).state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return path


def raw_loop(enc: ClipEncoder, paths: list[Path], batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([enc.preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch_size]])
            feats = enc.model.encode_image(batch.to(enc.device, enc.input_dtype))
            (feats / feats.norm(dim=-1, keepdim=True)).float().cpu()
    return time.perf_counter() - t0


def load_sentences(path: str | None, max_tokens: int = 26) -> list[list[str]]:
    """Tweets of Twitter-GMNER (the kind of sentence the stage sees), else the test sample; <= max_tokens words."""
    from gmner_pipeline.ingest.conll import read_conll_blocks

    if path and Path(path).is_file():
        blocks = read_conll_blocks(path, header_prefix="IMGID:")
    else:
        blocks = read_conll_blocks(REPO / "tests" / "data" / "retrieve" / "sample.conll")
    return [b.tokens for b in blocks if 0 < len(b.tokens) <= max_tokens]


def stage_pass(stage: RetrieveStage, enc: ClipEncoder, paths: list[Path], k: int, sentences: list[list[str]]) -> float:
    records = [empty_record(id=f"r{i}", source="bench", text=" ".join(tokens), tokens=tokens, grounding_labels="absent")
               for i, tokens in zip(range(len(paths) // k), itertools.cycle(sentences))]
    stage.attach(enc, FileCandidates(paths, k))
    t0 = time.perf_counter()
    out = stage(records)
    seconds = time.perf_counter() - t0
    assert all(r["retrieval"] and len(r["retrieval"]["candidates"]) == k for r in out)
    return seconds


def image_path(enc: ClipEncoder, paths: list[Path]) -> float:
    """The stage's image side alone (checked load + preprocess + encode): what the corpus index build runs."""
    from gmner_pipeline.stages.retrieve.images import open_checked, to_rgb

    def load(path: Path):
        img, _ = open_checked(path.read_bytes(), 10**9)
        return to_rgb(img), None

    t0 = time.perf_counter()
    enc.encode_images(paths, load)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", default=str(REPO.parent / "shared" / "images"))
    ap.add_argument("--sentences", default=str(REPO.parent / "shared" / "data" / "twitter-gmner-v2" / "txt" / "test.txt"),
                    help="CoNLL file with IMGID headers whose tweets become the records' text")
    ap.add_argument("--n", type=int, default=80, help="images per pass (the folder is cycled)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=5, help="candidates per record (VKEL: 5)")
    ap.add_argument("--loader-threads", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of raw/stage/image-path passes; medians reported")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        sys.exit(f"no images in {args.images}")
    n = args.n - args.n % args.candidates
    paths = list(itertools.islice(itertools.cycle(files), n))

    cfg = RetrieveConfig.model_validate({
        "source": {"kind": "local_corpus", "path": args.images}, "alpha": -1.0,
        "clip": {"model": args.model, "pretrained": str(random_checkpoint(args.model)), "batch_size": args.batch_size,
                 "loader_threads": args.loader_threads, "device": args.device},
    })
    enc = ClipEncoder(cfg.clip)
    stage = RetrieveStage(cfg)

    warm = paths[: args.batch_size]  # first-call costs (allocator, kernels) out of the measurement
    raw_loop(enc, warm, args.batch_size)
    sentences = load_sentences(args.sentences)
    stage_pass(stage, enc, warm[: len(warm) - len(warm) % args.candidates] or paths[: args.candidates],
               args.candidates, sentences)
    # Short rounds, each running the three passes back to back: on a shared machine the load drifts over minutes, so
    # the per-round ratios (the passes of one round see about the same load) are what we compare; process CPU time
    # is reported too because it is much less sensitive to other processes than wall time.
    rounds: list[dict[str, float]] = []
    for _ in range(args.rounds):
        r: dict[str, float] = {}
        for name, run in (("raw", lambda: raw_loop(enc, paths, args.batch_size)),
                          ("stage", lambda: stage_pass(stage, enc, paths, args.candidates, sentences)),
                          ("image_path", lambda: image_path(enc, paths))):
            cpu0 = time.process_time()
            r[f"{name}_wall"] = run()
            r[f"{name}_cpu"] = time.process_time() - cpu0
        rounds.append(r)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def ratio(name: str, kind: str) -> float:  # throughput ratio = raw time / path time, median over rounds
        return round(statistics.median(r[f"raw_{kind}"] / r[f"{name}_{kind}"] for r in rounds), 3)

    result = {
        "model": args.model, "device": enc.device, "precision": enc.precision,
        "gpu": torch.cuda.get_device_name(0) if enc.device == "cuda" else None,
        "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
        "images_per_pass": n, "distinct_files": len(files), "batch_size": args.batch_size,
        "candidates": args.candidates, "loader_threads": args.loader_threads, "rounds": args.rounds,
        "sentences": len(sentences), "mean_words": round(statistics.mean(len(t) for t in sentences), 1),
        "raw_images_per_s": round(n / med("raw_wall"), 2),
        "stage_images_per_s": round(n / med("stage_wall"), 2),
        "image_path_images_per_s": round(n / med("image_path_wall"), 2),
        "ratio_stage_vs_raw": ratio("stage", "wall"),
        "ratio_image_path_vs_raw": ratio("image_path", "wall"),
        "ratio_stage_vs_raw_cpu_time": ratio("stage", "cpu"),
        "ratio_image_path_vs_raw_cpu_time": ratio("image_path", "cpu"),
        "rounds_seconds": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    enc.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

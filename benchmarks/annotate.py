"""Annotate stage throughput vs the raw engine loop: same model, same batch size, same images, one process.

The raw loop is what one would write by hand around the engine: decode each image, letterbox + normalise, one
forward pass per batch (onnxruntime ``session.run``; for mmdet its test pipeline + ``model.test_step``). The stage adds
records, top-K/class names/annotation text, error handling and lineage. Rounds alternate (raw, stage, raw, ...) and
the best round of each counts (the median ratio is printed too), so that load from other processes hurts both
alike. Target: ratio >= 0.9.

    python benchmarks/annotate.py --backend onnxruntime --model ../shared/models/rtmdet-nano-person.onnx \\
        --images ../shared/images --input-size 320 --rgb --batch-size 8
    python benchmarks/annotate.py --backend mmdet --random-tiny --images ../shared/images --batch-size 4

``--random-tiny`` builds RTMDet-tiny with random weights offline (same cost per image as trained weights); it is for
speed measurement only.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RGB_MEAN, RGB_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
BGR_MEAN, BGR_STD = RGB_MEAN[::-1], RGB_STD[::-1]


def image_list(folder: Path, count: int) -> list[str]:
    photos = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not photos:
        raise SystemExit(f"no .png/.jpg images in {folder}")
    return [photos[i % len(photos)] for i in range(count)]


def decode_bgr(path: str) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB"))[..., ::-1])


def raw_onnx_loop(args, paths: list[str]):
    import cv2
    import onnxruntime as ort

    available = ort.get_available_providers()  # the stage's default: CUDA when available, else CPU
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    session = ort.InferenceSession(args.model, providers=providers)
    name = session.get_inputs()[0].name
    size = args.input_size
    mean, std = (RGB_MEAN, RGB_STD) if args.rgb else (BGR_MEAN, BGR_STD)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def preprocess(batch_paths):
        batch = []
        for path in batch_paths:
            img = decode_bgr(path)
            if args.rgb:
                img = img[..., ::-1]
            h, w = img.shape[:2]
            scale = min(size / h, size / w)
            nw, nh = int(w * scale + 0.5), int(h * scale + 0.5)
            canvas = np.full((size, size, 3), 114, np.uint8)
            canvas[:nh, :nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
            batch.append(canvas)
        x = ((np.stack(batch).astype(np.float32) - mean) / std).transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def run():
        for start in range(0, len(paths), args.batch_size):
            session.run(None, {name: preprocess(paths[start:start + args.batch_size])})

    # Engine only (inputs prepared beforehand), to show where the time goes; not the ratio's reference.
    ready = [preprocess(paths[i:i + args.batch_size]) for i in range(0, len(paths), args.batch_size)]

    def engine_only():
        for x in ready:
            session.run(None, {name: x})

    return run, engine_only


def raw_mmdet_loop(args, paths: list[str], config: str, checkpoint: str):
    import torch

    from gmner_pipeline.stages.annotate import mmcv_shim

    mmcv_shim.install()
    from mmcv.transforms import Compose
    from mmdet.apis import init_detector
    from mmdet.utils import get_test_pipeline_cfg

    model = init_detector(config, checkpoint, device=args.device)
    steps = [s for s in get_test_pipeline_cfg(model.cfg.copy()) if "LoadAnnotations" not in str(s["type"])]
    steps[0]["type"] = "mmdet.LoadImageFromNDArray"
    pipeline = Compose(steps)

    def run():
        for start in range(0, len(paths), args.batch_size):
            packed = [pipeline({"img": decode_bgr(p), "img_id": 0}) for p in paths[start:start + args.batch_size]]
            with torch.no_grad():
                model.test_step({"inputs": [p["inputs"] for p in packed],
                                 "data_samples": [p["data_samples"] for p in packed]})

    return run, None


def stage_loop(args, paths: list[str], detector: dict):
    from gmner_pipeline.schema import empty_record
    from gmner_pipeline.stages.annotate import AnnotateConfig, AnnotateStage

    config = AnnotateConfig.model_validate({"detector": detector, "inference_batch_size": args.batch_size})
    AnnotateStage.preflight(config)
    stage = AnnotateStage(config)
    stage.setup()

    def run():
        records = [empty_record(id=str(i), source="bench", image={"path": p}) for i, p in enumerate(paths)]
        for start in range(0, len(records), args.records_per_call):
            out = stage(records[start:start + args.records_per_call])
            bad = [r for r in out if r["status"] != "ok"]
            if bad:
                raise SystemExit(f"stage failed on {bad[0]['image']['path']}: {bad[0]['error']}")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["onnxruntime", "mmdet"], default="onnxruntime")
    parser.add_argument("--model", help="onnx file, or mmdet config / model-zoo name")
    parser.add_argument("--checkpoint", help="mmdet checkpoint")
    parser.add_argument("--random-tiny", action="store_true",
                        help="mmdet: RTMDet-tiny with random weights (speed only)")
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "images"))
    parser.add_argument("--num-images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (both loops)")
    parser.add_argument("--records-per-call", type=int, default=64, help="records per stage call (runner batch)")
    parser.add_argument("--input-size", type=int, default=640, help="onnxruntime: square model input")
    parser.add_argument("--rgb", action="store_true", help="onnxruntime: model takes RGB with RGB-order mean/std")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    paths = image_list(Path(args.images), args.num_images)

    if args.backend == "onnxruntime":
        if not args.model:
            raise SystemExit("--model PATH.onnx is required for the onnxruntime backend")
        mean, std = (RGB_MEAN, RGB_STD) if args.rgb else (BGR_MEAN, BGR_STD)
        detector = {"backend": "onnxruntime", "path": args.model, "input_size": [args.input_size] * 2,
                    "channel_order": "rgb" if args.rgb else "bgr", "mean": list(mean), "std": list(std)}
        raw, engine_only = raw_onnx_loop(args, paths)
    else:
        if args.random_tiny:
            sys.path.insert(0, str(REPO / "tests" / "integration"))
            from annotate_models import build_rtmdet_tiny

            config, checkpoint = build_rtmdet_tiny(Path(tempfile.mkdtemp()), size=640)
            config, checkpoint = str(config), str(checkpoint)
        else:
            config, checkpoint = args.model, args.checkpoint
        detector = {"backend": "mmdet", "model": config, "checkpoint": checkpoint, "device": args.device}
        raw, engine_only = raw_mmdet_loop(args, paths, config, checkpoint)
    staged = stage_loop(args, paths, detector)

    raw(), staged()  # warm-up: sessions, allocator, page cache
    raw_times, stage_times = [], []
    for _ in range(args.rounds):
        for loop, times in ((raw, raw_times), (staged, stage_times)):
            t0 = time.perf_counter()
            loop()
            times.append(time.perf_counter() - t0)
    engine_times = []
    if engine_only is not None:
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            engine_only()
            engine_times.append(time.perf_counter() - t0)
    raw_ips, stage_ips = len(paths) / min(raw_times), len(paths) / min(stage_times)
    print(f"backend={args.backend} images={len(paths)} batch_size={args.batch_size} rounds={args.rounds}")
    print(f"raw engine loop: {raw_ips:8.2f} images/s  (rounds: {', '.join(f'{t:.2f}s' for t in raw_times)})")
    print(f"annotate stage:  {stage_ips:8.2f} images/s  (rounds: {', '.join(f'{t:.2f}s' for t in stage_times)})")
    if engine_times:
        print(f"engine only:     {len(paths) / min(engine_times):8.2f} images/s  (session.run on prepared inputs; "
              "for reference)")
    median_ratio = float(np.median(raw_times) / np.median(stage_times))
    print(f"ratio stage/raw: {stage_ips / raw_ips:.3f} best rounds, {median_ratio:.3f} median rounds  (target >= 0.9)")


if __name__ == "__main__":
    main()

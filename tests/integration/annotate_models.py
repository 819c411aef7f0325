"""Builders for the annotate tests: a random-weight RTMDet-tiny checkpoint (offline, from mmdet's bundled config) and
its raw-head ONNX export. Random weights are for tests only; the class bias is raised so that boxes clear thresholds."""

from __future__ import annotations

from pathlib import Path

CLASSES = ("cat", "dog", "kite")
BIASED_CLASS = 2  # every confident box of the test model is a "kite"


def build_rtmdet_tiny(out_dir: Path, classes=CLASSES, seed: int = 0, size: int = 320) -> tuple[Path, Path]:
    """Write (config.py, checkpoint.pth) for RTMDet-tiny with ``len(classes)`` classes and random weights, testing at
    ``size`` x ``size`` (the zoo config's 640 costs 4x the CPU time for the same code path)."""
    import torch
    from mmengine.config import Config

    from gmner_pipeline.stages.annotate import mmcv_shim
    from gmner_pipeline.stages.annotate.mmdet_backend import resolve_model

    mmcv_shim.install()
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    zoo_config, _ = resolve_model("rtmdet_tiny_8xb32-300e_coco")
    cfg = Config.fromfile(str(zoo_config))
    cfg.model.bbox_head.num_classes = len(classes)
    cfg.model.backbone.init_cfg = None  # no ImageNet download: weights stay random
    for step in cfg.test_dataloader.dataset.pipeline:
        if step["type"] == "Resize":
            step["scale"] = (size, size)
        if step["type"] == "Pad":
            step["size"] = (size, size)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "rtmdet_tiny_test.py"
    cfg.dump(str(config_path))
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    # Random init leaves the head's inputs tiny (std ~1e-3), so every score would be ~sigmoid(bias) and every box the
    # same size: large head weights spread scores and box sizes so that top-K order and NMS are actually exercised.
    with torch.no_grad():
        for conv in model.bbox_head.rtm_cls:
            torch.nn.init.normal_(conv.weight, std=200.0)
            conv.bias.fill_(-6.0)
            conv.bias[BIASED_CLASS] = 0.0
        for conv in model.bbox_head.rtm_reg:
            torch.nn.init.normal_(conv.weight, std=100.0)
            conv.bias.fill_(4.0)  # distances ~4 strides: boxes of 8-16 strides, mostly positive sizes
    checkpoint = out_dir / "rtmdet_tiny_random.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"dataset_meta": {"classes": tuple(classes)}}}, checkpoint)
    return config_path, checkpoint


def export_raw_head(config_path: Path, checkpoint: Path, onnx_path: Path, size: int = 320) -> Path:
    """torch.onnx.export (TorchScript exporter) of backbone + neck + head: outputs 3 class maps then 3 box maps."""
    import torch

    from gmner_pipeline.stages.annotate import mmcv_shim

    mmcv_shim.install()
    from mmdet.apis import init_detector

    model = init_detector(str(config_path), str(checkpoint), device="cpu")

    class RawHead(torch.nn.Module):
        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, x):
            cls_scores, bbox_preds = self.detector._forward(x)
            return (*cls_scores, *bbox_preds)

    wrapper = RawHead(model).eval()
    names = [f"cls_{s}" for s in (8, 16, 32)] + [f"bbox_{s}" for s in (8, 16, 32)]
    torch.onnx.export(wrapper, torch.zeros(1, 3, size, size), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=names, dynamic_axes={"input": {0: "batch"}})
    return onnx_path

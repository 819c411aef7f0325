"""RTMDet through mmdet's own inference API (``init_detector``, the model's test pipeline, ``model.test_step``), one
forward pass per batch. mmdet runs on mmcv-lite plus our ``mmcv._ext`` shim (see mmcv_shim.py, docs/annotate.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import numpy as np

from gmner_pipeline.stage import StageSetupError

from . import mmcv_shim
from .backends import DetectorBackend
from .boxes import RawDetection
from .config import MmdetDetectorConfig

logger = logging.getLogger(__name__)


def _mmdet_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mmdet")
    if spec is None or not spec.submodule_search_locations:
        raise StageSetupError('mmdet is not installed: pip install -e ".[detect]" (see docs/annotate.md)')
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(model: str) -> tuple[Path, str | None]:
    """A config path, or a model-zoo name -> (config file, the zoo's weights URL or None)."""
    path = Path(model).expanduser()
    if path.suffix == ".py":
        if not path.is_file():
            raise StageSetupError(f"mmdet config not found at {model}")
        return path, None
    configs = _mmdet_root() / ".mim" / "configs"
    stem = model[:-3] if model.endswith(".py") else model
    # The config's own folder first (cheap), then every metafile (for aliases such as "rtmdet-t").
    own = sorted(configs.glob(f"*/{stem}.py"))
    metafiles = [p.parent / "metafile.yml" for p in own] + sorted(configs.glob("*/metafile.yml"))
    for metafile in metafiles:
        for entry in _metafile_models(metafile):
            if entry.get("Name") == stem or stem in (entry.get("Alias") or []):
                return configs.parent / entry["Config"], entry.get("Weights")
    if own:
        return own[0], None
    raise StageSetupError(f"{model!r} is neither a config file nor an mmdet model-zoo name (see the metafile.yml files "
                          f"under {configs})")


def _metafile_models(metafile: Path) -> list[dict]:
    import yaml

    if not metafile.is_file():
        return []
    data = yaml.safe_load(metafile.read_text(encoding="utf-8"))
    models = data.get("Models", []) if isinstance(data, dict) else []
    return [m for m in models if isinstance(m, dict)]


def _cache_path(url: str) -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def resolve_checkpoint(config: MmdetDetectorConfig, download: bool) -> Path:
    """The local weights file; URLs (given, or the zoo's) live in the torch hub cache and are fetched only here."""
    _, zoo_url = resolve_model(config.model)
    spec = config.checkpoint or zoo_url
    how = ("download the .pth on a machine with access and set stages.annotate.detector.checkpoint to its path, "
           "or use the onnxruntime backend with an exported model (docs/annotate.md, 'Providing weights')")
    if spec is None:
        raise StageSetupError(f"no checkpoint for mmdet model {config.model!r} (not in the model zoo): set "
                              "stages.annotate.detector.checkpoint to a .pth file")
    if urlparse(spec).scheme in ("http", "https"):
        cached = _cache_path(spec)
        if cached.is_file():
            return cached
        if not download:
            raise StageSetupError(f"weights {spec} are not in the cache ({cached}): {how}")
        import torch.hub

        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            logger.info("downloading %s to %s", spec, cached)
            torch.hub.download_url_to_file(spec, str(cached), progress=False)
        except Exception as exc:  # noqa: BLE001 - any network failure means the same thing to the user
            raise StageSetupError(f"could not download RTMDet weights {spec} ({exc}): {how}") from exc
        return cached
    path = Path(spec).expanduser()
    if not path.is_file():
        raise StageSetupError(f"mmdet checkpoint not found at {spec}: {how}")
    return path


def _device(spec: str) -> str:
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class MmdetBackend(DetectorBackend):
    name = "mmdet"

    @classmethod
    def preflight(cls, config: MmdetDetectorConfig) -> None:
        resolve_checkpoint(config, download=True)

    def __init__(self, config: MmdetDetectorConfig):
        super().__init__(config)
        mmcv_shim.install()  # before the first mmdet import: mmcv.ops needs an mmcv._ext
        from mmcv.transforms import Compose
        from mmdet.apis import init_detector
        from mmdet.utils import get_test_pipeline_cfg
        from mmengine.registry import init_default_scope

        config_path, _ = resolve_model(config.model)
        checkpoint = resolve_checkpoint(config, download=False)
        self.model = init_detector(str(config_path), str(checkpoint), device=_device(config.device))
        init_default_scope(self.model.cfg.get("default_scope", "mmdet"))
        steps = [step for step in get_test_pipeline_cfg(self.model.cfg.copy())
                 if "LoadAnnotations" not in str(step["type"])]  # inference has no ground truth
        steps[0]["type"] = "mmdet.LoadImageFromNDArray"  # we hand over decoded BGR arrays
        self.pipeline = Compose(steps)
        self._model_id = f"mmdet:{config_path.stem}@{checkpoint.name}"
        classes = (self.model.dataset_meta or {}).get("classes")
        self._class_names = [str(c) for c in classes] if classes else None

    def collate(self, images: Sequence[np.ndarray]) -> dict:
        packed = [self.pipeline({"img": img, "img_id": i}) for i, img in enumerate(images)]
        return {"inputs": [p["inputs"] for p in packed], "data_samples": [p["data_samples"] for p in packed]}

    def detect(self, images: Sequence[np.ndarray]) -> list[list[RawDetection]]:
        import torch

        with torch.no_grad():
            samples = self.model.test_step(self.collate(images))  # data_preprocessor pads + stacks the batch
        results = []
        for sample in samples:
            pred = sample.pred_instances
            boxes = pred.bboxes.cpu().numpy()
            scores = pred.scores.cpu().numpy()
            labels = pred.labels.cpu().numpy()
            results.append([RawDetection(int(label), float(s), tuple(map(float, b)))
                            for b, s, label in zip(boxes, scores, labels, strict=True)])
        return results

    def close(self) -> None:
        self.model = None

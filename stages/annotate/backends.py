"""The detector backend interface and its explicit registry (backend name -> "module:Class", imported lazily so that
a run needs only the libraries of the backend it uses)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

from .boxes import RawDetection

BACKENDS: dict[str, str] = {
    "onnxruntime": "gmner_pipeline.stages.annotate.onnx_backend:OnnxBackend",
    "mmdet": "gmner_pipeline.stages.annotate.mmdet_backend:MmdetBackend",
}


class DetectorBackend(ABC):
    """Loads one detector and maps decoded images (uint8 BGR arrays) to detections in original pixels."""

    name: str = ""

    def __init__(self, config: Any):
        self.config = config
        # Set by each backend when it loads its model (see the two properties below).
        self._model_id = ""
        self._class_names: list[str] | None = None

    @classmethod
    @abstractmethod
    def preflight(cls, config: Any) -> None:
        """Raise StageSetupError (with what to do) when the weights/config cannot be found. Runs in the driver."""

    @property
    def model_id(self) -> str:
        """Identifies the weights (file name + content hash, or config + checkpoint)."""
        return self._model_id

    @property
    def class_names(self) -> Sequence[str] | None:
        """Class names from the model's own metadata, when it carries them."""
        return self._class_names

    @abstractmethod
    def detect(self, images: Sequence[np.ndarray]) -> list[list[RawDetection]]:
        """One forward pass over a batch; every detection of each image (filtering is the stage's job)."""

    def close(self) -> None:
        pass


def backend_class(name: str) -> type[DetectorBackend]:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown detector backend {name!r}; known: {sorted(BACKENDS)}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)

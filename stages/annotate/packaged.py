"""Detectors that ship inside the package, named ``packaged:<name>`` in ``stages.annotate.detector.path``.

Only one today: RTMDet-nano (person), so that the default run annotates real photos with a real detector on a fresh,
offline machine (models/PROVENANCE.md says where it comes from and under which licence). A packaged detector brings
its own preprocessing; a setting given in the config still wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "packaged:"
MODELS_DIR = Path(__file__).resolve().parent / "models"


@dataclass(frozen=True)
class PackagedDetector:
    file: str
    class_names: list[str]
    settings: dict[str, Any] = field(default_factory=dict)  # OnnxDetectorConfig fields the export was made with


PACKAGED: dict[str, PackagedDetector] = {
    "rtmdet-nano-person": PackagedDetector(
        file="rtmdet-nano-person.onnx",
        class_names=["person"],
        settings={"output_format": "end2end", "input_size": [320, 320], "channel_order": "rgb",
                  "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
    ),
}


def packaged_name(path: str | None) -> str | None:
    """The packaged detector a config path names, or None for an ordinary file path."""
    return path[len(PREFIX):] if path and path.startswith(PREFIX) else None


def lookup(name: str) -> PackagedDetector:
    try:
        return PACKAGED[name]
    except KeyError:
        raise ValueError(f"no packaged detector {name!r}; packaged detectors: "
                         f"{', '.join(PREFIX + n for n in sorted(PACKAGED))}") from None


def with_packaged_settings(values: dict[str, Any]) -> dict[str, Any]:
    """An ONNX detector config (raw dict) with a packaged detector's preprocessing filled in where not given."""
    name = packaged_name(values.get("path"))
    if name is None:
        return values
    return {**lookup(name).settings, **values}


def resolve_path(path: str) -> Path:
    """The file a config path points at: the packaged model's file, or the path itself (``~`` expanded)."""
    name = packaged_name(path)
    return MODELS_DIR / lookup(name).file if name is not None else Path(path).expanduser()


def packaged_class_names(path: str | None) -> list[str] | None:
    name = packaged_name(path)
    return list(lookup(name).class_names) if name is not None else None

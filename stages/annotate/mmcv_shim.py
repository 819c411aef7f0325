"""A stand-in for mmcv's compiled extension (``mmcv._ext``) so that mmdet runs on ``mmcv-lite``.

Why: mmdet 3.x needs ``mmcv>=2.0.0rc4,<2.2.0``. PyPI has full mmcv only as source, and that source does not compile
against current torch (its C++17 build meets torch headers that need C++20). ``mmcv-lite`` is the same Python package
without the compiled ops, but every ``mmcv.ops`` module loads ``mmcv._ext`` when imported, so ``import mmdet`` fails.

RTMDet's inference path needs exactly one compiled op: ``nms`` (through ``mmcv.ops.batched_nms``). This module gives
mmcv an ``_ext`` whose ``nms`` is torchvision's (same greedy algorithm, same output order), and whose every other op
raises a clear error when CALLED (mmcv only checks at import that the names exist). Where a real compiled mmcv is
installed, ``install()`` leaves it alone.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types
from typing import Any

logger = logging.getLogger(__name__)

SHIM_NAME = "mmcv._ext"
_MARKER = "__gmner_pipeline_shim__"


def _nms(bboxes: Any, scores: Any, iou_threshold: float, offset: int = 0) -> Any:
    """mmcv's ``ext_module.nms``: indices of the kept boxes, highest score first."""
    import torch
    from torchvision.ops import nms

    if bboxes.numel() == 0:
        return bboxes.new_zeros(0, dtype=torch.long)
    if offset:  # mmcv 1.x legacy "+1" pixel convention: widen the boxes so torchvision's areas match
        bboxes = bboxes.clone()
        bboxes[:, 2:] += offset
    return nms(bboxes.float(), scores.float(), float(iou_threshold))


def _unavailable(name: str) -> Any:
    def op(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"mmcv op {name!r} needs mmcv's compiled extension, which is not installed (gmner-pipeline runs mmdet on "
            "mmcv-lite with an nms-only shim, enough for RTMDet). For other models install a compiled mmcv "
            "(see docs/annotate.md)."
        )

    op.__name__ = name
    return op


def _module_getattr(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(name)


def build_module() -> types.ModuleType:
    module = types.ModuleType(SHIM_NAME, __doc__)
    # A spec without a loader: importlib/pkgutil lookups work, and mmengine's mmcv_full_available() says False.
    module.__spec__ = importlib.machinery.ModuleSpec(SHIM_NAME, loader=None, origin=__name__)
    module.nms = _nms  # type: ignore[attr-defined]
    module.get_compiler_version = lambda: "gmner-pipeline mmcv._ext shim (no compiled ops)"  # type: ignore[attr-defined]
    module.get_compiling_cuda_version = lambda: "not compiled"  # type: ignore[attr-defined]
    module.__getattr__ = _module_getattr  # type: ignore[attr-defined]  # PEP 562: any other op name resolves
    setattr(module, _MARKER, True)
    return module


def compiled_mmcv_present() -> bool:
    existing = sys.modules.get(SHIM_NAME)
    if existing is not None:
        return not getattr(existing, _MARKER, False)
    try:
        return importlib.util.find_spec(SHIM_NAME) is not None
    except ModuleNotFoundError:  # mmcv itself is missing: the caller's import of mmdet will say so
        return False


def install() -> bool:
    """Register the shim as ``mmcv._ext`` unless a compiled one exists. Call before importing mmdet; idempotent.

    Returns True when the shim is (now) in place.
    """
    if SHIM_NAME in sys.modules:
        return bool(getattr(sys.modules[SHIM_NAME], _MARKER, False))
    if compiled_mmcv_present():
        return False
    import mmcv

    module = build_module()
    sys.modules[SHIM_NAME] = module
    mmcv._ext = module  # type: ignore[attr-defined]
    logger.info("mmcv has no compiled ops here: using gmner-pipeline's nms-only mmcv._ext shim (torchvision nms)")
    return True

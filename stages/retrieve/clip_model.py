"""CLIP through open_clip: resolve real weights (or fail with instructions), then encode texts and images in batches.

Weights are named the way open_clip names them:
  * a built-in architecture plus a pretrained tag (``ViT-B-32`` + ``openai``): open_clip downloads them once into its
    cache; offline, they must already be cached;
  * a built-in (or registered, ``model_config_file``) architecture plus a local checkpoint file;
  * ``hf-hub:org/repo`` or ``local-dir:/folder`` (``open_clip_config.json`` + weights in one folder).
``check_weights`` runs in the driver before the run; a model is never built without weights (``require_pretrained``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Sequence, TypeVar

import numpy as np

from gmner_pipeline.hashing import file_sha256
from gmner_pipeline.stage import StageSetupError

from .config import ClipConfig
from .images import UnreadableImage

log = logging.getLogger(__name__)

T = TypeVar("T")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

HOW_TO_PROVIDE = (
    "Provide real CLIP weights in one of these ways:\n"
    "  * run once with network access so open_clip caches them (tags such as 'openai' are downloaded from the "
    "Hugging Face hub into ~/.cache/huggingface; set HF_HOME or stages.retrieve.clip.cache_dir to choose where), then "
    "copy that cache to offline machines;\n"
    "  * or download a checkpoint file and set stages.retrieve.clip.pretrained=/path/to/weights.safetensors "
    "(with the matching stages.retrieve.clip.model architecture);\n"
    "  * or set stages.retrieve.clip.model=local-dir:/path/to/folder holding open_clip_config.json and the weights.\n"
    "See docs/retrieve.md, 'Providing CLIP weights'. The stage never runs with random weights."
)


@dataclass(frozen=True)
class WeightsSpec:
    """What will be loaded, resolved before the run: ``kind`` is tag | file | hf-hub | local-dir."""

    model: str
    pretrained: str | None
    kind: str
    checkpoint: str | None  # the local file that holds the weights, when known
    model_id: str  # recorded in every record and keying the corpus embeddings


def register_model_config(cfg: ClipConfig) -> None:
    if cfg.model_config_file:
        import open_clip

        path = Path(cfg.model_config_file)
        if not path.is_file():
            raise StageSetupError(f"stages.retrieve.clip.model_config_file {path} does not exist")
        open_clip.add_model_config(path)




def _file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a weights file (first 16 hex)."""
    return file_sha256(path)[:16]


def _find_weights_in_dir(folder: Path) -> Path | None:
    for suffix in _WEIGHT_SUFFIXES:
        found = sorted(folder.glob(f"*{suffix}"))
        if found:
            return found[0]
    return None


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "GMNER_OFFLINE"))


def _hf_cached(repo: str, names: list[str], cache_dir: str | None) -> str | None:
    """The first of ``names`` present in the local Hugging Face cache of ``repo`` (no network call)."""
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _tag_weights_file(tag_cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The local file of a pretrained tag: from the cache without any network call when it is there, else downloaded
    (skipped when HF_HUB_OFFLINE/GMNER_OFFLINE is set). None when it cannot be had."""
    from open_clip import pretrained as oc_pretrained

    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        names = [filename or "open_clip_pytorch_model.bin"]
        names = [n[: -len(Path(n).suffix)] + ".safetensors" for n in names if n.endswith((".bin", ".pth"))] + names
        hit = _hf_cached(repo, names, cache_dir)
        if hit:
            return hit
    elif tag_cfg.get("url"):
        cached = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(tag_cfg["url"])
        if cached.is_file():
            return str(cached)
    if _offline():
        return None
    try:
        return oc_pretrained.download_pretrained(tag_cfg, cache_dir=cache_dir) or None
    except Exception as exc:
        log.warning("downloading CLIP weights failed: %s", exc)
        return None


def check_weights(cfg: ClipConfig) -> WeightsSpec:
    """Make sure the configured weights can be loaded, fetching them into open_clip's cache when a network allows;
    raise ``StageSetupError`` saying how to provide them otherwise. Builds no model."""
    import open_clip
    from open_clip import pretrained as oc_pretrained

    register_model_config(cfg)
    model = cfg.model
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        config_file = folder / "open_clip_config.json"
        weights = _find_weights_in_dir(folder) if folder.is_dir() else None
        if not config_file.is_file() or weights is None:
            raise StageSetupError(
                f"CLIP model {model!r}: the folder must hold open_clip_config.json and a weights file "
                f"({', '.join(_WEIGHT_SUFFIXES)}); found config={config_file.is_file()}, weights={weights}.\n"
                + HOW_TO_PROVIDE
            )
        digest = hashlib.sha256(config_file.read_bytes()).hexdigest()[:8] + _file_digest(weights)
        return WeightsSpec(model, None, "local-dir", str(weights), f"open_clip:local-dir:{folder.name}:{digest}")
    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
        config_file = _hf_cached(repo, ["open_clip_config.json"], cfg.cache_dir)
        weights = _hf_cached(repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"], cfg.cache_dir)
        if (config_file is None or weights is None) and not _offline():
            try:
                oc_pretrained.download_pretrained_from_hf(repo, filename="open_clip_config.json",
                                                          cache_dir=cfg.cache_dir)
                weights = oc_pretrained.download_pretrained_from_hf(repo, cache_dir=cfg.cache_dir)
                config_file = str(Path(weights).parent / "open_clip_config.json")
            except Exception as exc:
                log.warning("downloading %s failed: %s", model, exc)
        if config_file is None or weights is None or not Path(config_file).is_file():
            raise StageSetupError(f"CLIP model {model!r}: its config/weights are not in the local cache and cannot "
                                  "be downloaded now.\n" + HOW_TO_PROVIDE)
        return WeightsSpec(model, None, "hf-hub", str(weights), f"open_clip:hf-hub:{repo}")

    arch = model.replace("/", "-")
    if arch not in open_clip.list_models():
        raise StageSetupError(
            f"unknown open_clip architecture {model!r}; known include ViT-B-32, ViT-B-16, ViT-L-14 (see "
            "open_clip.list_models()), or register your own with stages.retrieve.clip.model_config_file"
        )
    if not cfg.pretrained:
        raise StageSetupError(f"stages.retrieve.clip.pretrained is not set for {model!r}.\n" + HOW_TO_PROVIDE)
    tag_cfg = oc_pretrained.get_pretrained_cfg(arch, cfg.pretrained)
    if tag_cfg:
        path = _tag_weights_file(tag_cfg, cfg.cache_dir)
        if path is None:
            raise StageSetupError(
                f"CLIP weights {arch}/{cfg.pretrained} are not in the local cache and cannot be downloaded now.\n"
                + HOW_TO_PROVIDE
            )
        return WeightsSpec(arch, cfg.pretrained, "tag", path, f"open_clip:{arch}:{cfg.pretrained}")
    path = Path(cfg.pretrained).expanduser()
    if path.is_file():
        return WeightsSpec(arch, str(path), "file", str(path), f"open_clip:{arch}:file-{_file_digest(path)}")
    tags = oc_pretrained.list_pretrained_tags_by_model(arch)
    raise StageSetupError(
        f"stages.retrieve.clip.pretrained={cfg.pretrained!r} is neither a pretrained tag of {arch} "
        f"(known: {', '.join(tags) or 'none'}) nor an existing file.\n" + HOW_TO_PROVIDE
    )


def load_arguments(spec: WeightsSpec) -> tuple[str, str | None, dict[str, Any]]:
    """(model name, pretrained, preprocess overrides) for open_clip.create_model, always naming a LOCAL file so that
    workers never touch the network: a tag loads its cached file with the tag's preprocessing (what open_clip itself
    does for a tag), an hf-hub model loads the cached snapshot folder as a local-dir."""
    from open_clip import pretrained as oc_pretrained

    if spec.kind == "tag":
        tag_cfg = oc_pretrained.get_pretrained_cfg(spec.model, spec.pretrained or "")
        keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
        return spec.model, spec.checkpoint, {k: tag_cfg[k] for k in keys if tag_cfg.get(k) is not None}
    if spec.kind == "hf-hub":
        return f"local-dir:{Path(spec.checkpoint).parent}", None, {}  # type: ignore[arg-type]
    if spec.kind == "local-dir":
        return spec.model, None, {}
    return spec.model, spec.checkpoint, {}


def resolve_device(cfg: ClipConfig) -> tuple[str, str]:
    """(device, open_clip precision): auto picks CUDA with fp16 when available, else CPU with fp32."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise StageSetupError("stages.retrieve.clip.device=cuda but torch sees no GPU; use auto or cpu")
    precision = cfg.precision
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    return device, precision


@dataclass
class EncodedImages(Generic[T]):
    embeddings: np.ndarray  # [n, d] float32, L2-normalised; NaN rows where the image failed
    metas: list[Any]  # what the loader returned beside each image (None for failures)
    errors: list[str | None]  # why an image failed, else None


class ClipEncoder:
    """One loaded CLIP model: batched, normalised text and image embeddings as float32 numpy arrays."""

    def __init__(self, cfg: ClipConfig, spec: WeightsSpec | None = None):
        import open_clip
        import torch
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.cfg = cfg
        self.spec = spec or check_weights(cfg)
        self.device, self.precision = resolve_device(cfg)
        model_name, pretrained, preprocess_cfg = load_arguments(self.spec)
        try:
            model = open_clip.create_model(
                model_name, pretrained=pretrained, precision=self.precision, device=self.device,
                cache_dir=cfg.cache_dir, require_pretrained=True, force_preprocess_cfg=preprocess_cfg,
            )
        except Exception as exc:
            raise StageSetupError(f"cannot load CLIP {self.spec.model_id}: {exc}\n" + HOW_TO_PROVIDE) from exc
        self.model = model.eval()
        self.preprocess = image_transform_v2(PreprocessCfg(**self.model.visual.preprocess_cfg), is_train=False)
        self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cfg.cache_dir)
        self._torch = torch
        # open_clip's low-precision models take inputs of their own dtype (what its training loop does for fp16).
        self.input_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        self._pool = ThreadPoolExecutor(max_workers=cfg.loader_threads, thread_name_prefix="clip-load")
        log.info("loaded CLIP %s on %s (%s)", self.spec.model_id, self.device, self.precision)

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    def _finish(self, features) -> np.ndarray:
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.cfg.batch_size):
                tokens = self.tokenizer(list(texts[i:i + self.cfg.batch_size])).to(self.device)
                out.append(self._finish(self._encode_tokens(tokens)))
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out)

    def _encode_tokens(self, tokens):
        """``model.encode_text``, computed only up to the batch's last end-of-text token when that gives the same
        numbers: in open_clip's standard CLIP text tower attention is causal and the output is read at the EOT token
        (the highest id, pooled by argmax), so the padding after it never influences the result. Sentences of <= 26
        words fill ~30 of the 77 positions, so this makes text encoding several times cheaper."""
        import open_clip.model as oc_model

        m = self.model
        if not (type(m) is oc_model.CLIP and getattr(m, "text_pool_type", None) == "argmax"
                and getattr(m, "attn_mask", None) is not None):
            return m.encode_text(tokens)
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:length].to(cast_dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:length, :length]))
        x = x[self._torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = m.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, self._torch.nn.Linear) else x @ proj

    @property
    def dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if proj is not None and hasattr(proj, "shape"):
            return int(proj.shape[-1])
        return int(self.encode_texts(["a"]).shape[1])

    def _prepare(self, load: Callable[[T], tuple[Any, Any]], item: T):
        try:
            img, meta = load(item)
            return self.preprocess(img), meta, None
        except UnreadableImage as exc:
            return None, None, str(exc)
        except OSError as exc:
            return None, None, f"cannot read image: {exc}"

    def encode_images(self, items: Sequence[T], load: Callable[[T], tuple[Any, Any]]) -> EncodedImages[T]:
        """Encode ``items`` in batches; ``load(item) -> (PIL image, meta)``. The next batch is decoded and
        preprocessed in threads while the model runs on the current one, so decoding hides behind compute."""
        torch = self._torch
        n, bs = len(items), self.cfg.batch_size
        embeddings: np.ndarray | None = None
        metas: list[Any] = [None] * n
        errors: list[str | None] = [None] * n

        def submit(start: int) -> list[Future]:
            return [self._pool.submit(self._prepare, load, item) for item in items[start:start + bs]]

        pending = submit(0) if n else []
        with torch.inference_mode():
            for start in range(0, n, bs):
                results = [f.result() for f in pending]
                pending = submit(start + bs) if start + bs < n else []
                rows = [j for j, (tensor, _, _) in enumerate(results) if tensor is not None]
                for j, (_, meta, err) in enumerate(results):
                    metas[start + j], errors[start + j] = meta, err
                if not rows:
                    continue
                batch = torch.stack([results[j][0] for j in rows]).to(self.device, self.input_dtype, non_blocking=True)
                feats = self._finish(self.model.encode_image(batch))
                if embeddings is None:
                    embeddings = np.full((n, feats.shape[1]), np.nan, dtype=np.float32)
                embeddings[[start + j for j in rows]] = feats
        if embeddings is None:
            embeddings = np.full((n, self.dim), np.nan, dtype=np.float32)
        return EncodedImages(embeddings, metas, errors)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

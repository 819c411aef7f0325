"""The export formats: one writer per trainer family, each a function ``(examples, split, target, images) -> files``.

* ``swift``: ms-swift JSONL, E2E-GMNER's layout: ``{"messages": [{"role", "content"}], "images": [...],
  "solution": <gold answer>}`` per line, the image as ``<image>`` at the start of the user turn.
* ``sharegpt``: LLaMA-Factory's ShareGPT JSON (``conversations`` with ``from: human / gpt``, ``images``, ``system``)
  plus the ``dataset_info.json`` entry that registers it.
* ``hf``: Hugging Face Parquet, one folder per split, images embedded as ``datasets.Image`` features, with a card
  whose ``data_files`` name the splits (``datasets.load_dataset(<dir>)``).
* ``jsonl``: plain JSONL with the neutral messages, the target turn and the gold answer.

Images (not for ``hf``, which embeds them): ``relative`` (a path relative to the export folder), ``absolute``, or
``copy`` (into ``<dir>/images/``, named by content, referenced relatively). They are the ORIGINAL files: a trainer's
processor resizes them; for the ``qwen2_5_vl`` frame, give it the frame's pixel bounds (``export.json`` lists them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from .examples import Example, user_text

ImageMode = Literal["relative", "absolute", "copy"]
IMAGE_TOKEN = "<image>"
HF_BATCH = 256


class ImageRefs:
    """Where an exported example's image is found, as the chosen mode writes it."""

    def __init__(self, target: Path, mode: ImageMode):
        self.target, self.mode = target, mode
        self._copied: dict[str, str] = {}

    def __call__(self, path: str | None) -> str | None:
        if path is None:
            return None
        if self.mode == "absolute":
            return str(Path(path).resolve())
        if self.mode == "relative":
            return os.path.relpath(Path(path).resolve(), self.target.resolve())
        if path not in self._copied:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
            name = f"images/{digest}{Path(path).suffix.lower()}"
            dest = self.target / name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
            self._copied[path] = name
        return self._copied[path]


def _with_image(text: str, image: str | None) -> str:
    return f"{IMAGE_TOKEN}{text}" if image else text


def write_swift(examples: Iterable[Example], split: str, target: Path, images: ImageRefs) -> list[Path]:
    path = target / f"{split}.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            system, text = user_text(ex)
            ref = images(ex.image)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": _with_image(text, ref)}, {"role": "assistant", "content": ex.target}]
            row: dict[str, Any] = {"messages": messages}
            if ref:
                row["images"] = [ref]
            row |= {"solution": ex.answer, "id": ex.id}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return [path]


def write_sharegpt(examples: Iterable[Example], split: str, target: Path, images: ImageRefs) -> list[Path]:
    path = target / f"{split}.json"
    rows = []
    for ex in examples:
        system, text = user_text(ex)
        ref = images(ex.image)
        row: dict[str, Any] = {"conversations": [{"from": "human", "value": _with_image(text, ref)},
                                                 {"from": "gpt", "value": ex.target}]}
        if system:
            row["system"] = system
        if ref:
            row["images"] = [ref]
        row |= {"answer": ex.answer, "id": ex.id}
        rows.append(row)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    info_path = target / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    columns = {"messages": "conversations", "images": "images", "system": "system"}
    info[f"gmner_{split}"] = {"file_name": path.name, "formatting": "sharegpt", "columns": columns}
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [path, info_path]


def write_jsonl(examples: Iterable[Example], split: str, target: Path, images: ImageRefs) -> list[Path]:
    path = target / f"{split}.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            ref = images(ex.image)
            messages = []
            for msg in ex.messages:
                content = msg["content"]
                if not isinstance(content, str):
                    content = [{"type": "image", "image": ref} if p["type"] == "image" else p for p in content]
                messages.append({"role": msg["role"], "content": content})
            messages.append({"role": "assistant", "content": ex.target})
            fh.write(json.dumps({"id": ex.id, "record_id": ex.record_id, "split": split, "style": ex.style,
                                 "messages": messages, "images": [ref] if ref else [], "answer": ex.answer,
                                 "width": ex.width, "height": ex.height}, ensure_ascii=False) + "\n")
    return [path]


def hf_features() -> Any:
    from datasets import Features, Image, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    return Features({"id": Value("string"), "record_id": Value("string"), "style": Value("string"),
                     "messages": List(message), "images": List(Image()), "answer": Value("string"),
                     "width": Value("int32"), "height": Value("int32")})


def write_hf(examples: Iterable[Example], split: str, target: Path, images: ImageRefs) -> list[Path]:
    """``<dir>/<split>/part-00000.parquet`` with the images' bytes inside, and ``<dir>/README.md`` naming every split
    folder present."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = hf_features()
    schema = features.arrow_schema
    folder = target / split
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "part-00000.parquet"
    writer = pq.ParquetWriter(path, schema, compression="zstd")
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            batch.clear()

    try:
        for ex in examples:
            system, text = user_text(ex)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": _with_image(text, ex.image)}, {"role": "assistant", "content": ex.target}]
            pics = [{"bytes": Path(ex.image).read_bytes(), "path": Path(ex.image).name}] if ex.image else []
            batch.append(features.encode_example({"id": ex.id, "record_id": ex.record_id, "style": ex.style,
                                                  "messages": messages, "images": pics, "answer": ex.answer,
                                                  "width": ex.width, "height": ex.height}))
            if len(batch) >= HF_BATCH:
                flush()
        flush()
    finally:
        writer.close()
    card = target / "README.md"
    splits = sorted(p.name for p in target.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
    files = "".join(f"  - split: {s}\n    path: {s}/*.parquet\n" for s in splits)
    card.write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{files}tags:\n- gmner\n- gmner-pipeline\n"
                    "---\n# GMNER training examples (gmner-pipeline export)\n\nOne row per example: `messages` (the "
                    "user turn starts with `<image>`; the assistant turn is the reasoning chain and the answer), "
                    "`images` (embedded), `answer` (the gold answer in the same coordinate frame). `export.json` "
                    "holds the frame and the prompt's hash.\n", encoding="utf-8")
    return [path, card]


WRITERS: dict[str, Callable[[Iterable[Example], str, Path, ImageRefs], list[Path]]] = {
    "swift": write_swift, "sharegpt": write_sharegpt, "hf": write_hf, "jsonl": write_jsonl,
}

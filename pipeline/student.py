"""The student prompt: what the model being trained sees for a record, and the assistant turn it learns to write.

One builder for every place a student model meets a record, so that they can never drift apart:
grpo_filter samples the SFT policy with it, ``train`` builds SFT/GRPO examples with it, ``predict`` generates with it,
and ``export`` writes other trainers' formats with it. Its hash (``prompt_hash``) is part of every stage key and
lineage entry that uses it.

The user turn holds the instruction (``prompts/student/*.txt``: the task, the four constraints of MCR, the answer
format and the policy's coordinate frame), optional hints, and the tweet text; multimodal policies also get the image
(placed first). Text-only policies cannot see the image, so by default they get the detector's annotation text and the
entity knowledge as hints instead (``detections`` / ``knowledge``: ``auto``). Every box shown to the model and every
box in the target turn is in the policy's frame (``frames.py``); the shards keep original pixels.

Messages come out in a neutral form: content parts ``{"type": "text", "text"}`` and
``{"type": "image", "path", "width", "height"}``. ``to_openai`` turns them into an OpenAI chat request (the image
resized for the frame and inlined as a data URL); ``to_hf`` into a chat-template conversation plus PIL images, for
Hugging Face processors.

A warning about knowledge: the knowledge stage describes the entities it is given. Built from GOLD entities (its
default), it names the gold entities, so a prompt that includes it leaks the answer's spans. That is how VKEL trains,
but at evaluation time the knowledge must come from a stage-1 model's predicted entities; ``has_gold_knowledge``
lets ``predict`` refuse the leak.
"""

from __future__ import annotations

import hashlib
import html
from typing import Any, Literal, Sequence

from pydantic import Field

from .answer import DEFAULT_TYPES, Triple, format_answer, format_box, format_turn, gold_triples
from .configbase import Frozen
from .frames import ORIGINAL, FrameConfig, boxes_to_frame, model_image_size, prepare_image, text_to_frame, to_frame
from .prompts import load_text, prompt_hash as _files_hash

Messages = list[dict[str, Any]]


class StudentPromptConfig(Frozen):
    """How a record becomes the student model's prompt (shared by grpo_filter, train, predict and export)."""

    template: str = Field("student/gmner.txt", description="instruction template under prompts/")
    image: bool = Field(True, description="send the image (multimodal policy); false for text-only policies")
    detections: Literal["auto", "always", "never"] = Field(
        "auto", description="add the detector's boxes as a hint: auto = only when the image is not sent")
    knowledge: Literal["auto", "always", "never"] = Field(
        "auto", description="add the entity knowledge as a hint: auto = only when the image is not sent")
    max_detections: int = Field(5, ge=0, description="detector boxes shown at most (VKEL: top 5)")
    types: tuple[str, ...] = Field(DEFAULT_TYPES, description="the label set named in the instruction")
    frame: FrameConfig = Field(default_factory=lambda: ORIGINAL, description="the policy's coordinate frame")
    system: str | None = Field(None, description="an optional system message")

    def uses_detections(self) -> bool:
        return self.detections == "always" or (self.detections == "auto" and not self.image)

    def uses_knowledge(self) -> bool:
        return self.knowledge == "always" or (self.knowledge == "auto" and not self.image)


def prompt_hash(config: StudentPromptConfig) -> str:
    """Changes when the template text or any setting that shapes the prompt changes."""
    h = hashlib.sha256(_files_hash(config.template).encode())
    h.update(config.model_dump_json().encode())
    return h.hexdigest()[:16]


def tweet_text(record: dict[str, Any]) -> str:
    """The tweet as the student reads it: tokens joined by spaces, HTML entities unescaped (E2E-GMNER)."""
    tokens = record.get("tokens") or []
    text = " ".join(tokens) if tokens else (record.get("text") or "")
    return html.unescape(text)


def image_size(record: dict[str, Any]) -> tuple[int, int] | None:
    img = record.get("image") or {}
    w, h = img.get("width"), img.get("height")
    return (int(w), int(h)) if w and h else None


def detection_hint(record: dict[str, Any], config: StudentPromptConfig) -> str | None:
    det = record.get("detections") or {}
    boxes = (det.get("boxes") or [])[: config.max_detections]
    size = image_size(record)
    if not boxes or size is None:
        return None
    items = []
    for b in boxes:
        items.append(f"{b['label']}: " + format_box(to_frame(b["box"], size[0], size[1], config.frame)))
    return "Objects a detector found in the image: " + "; ".join(items) + "."


def knowledge_hint(record: dict[str, Any]) -> str | None:
    lines = []
    for item in record.get("knowledge") or []:
        text = (item.get("knowledge") or "").strip()
        if not text:
            continue
        kind = item.get("fine_type") or item.get("type")
        lines.append(f"- {item.get('entity')}" + (f" ({kind})" if kind else "") + f": {text}")
    return ("Background knowledge about entities that may appear:\n" + "\n".join(lines)) if lines else None


def has_gold_knowledge(record: dict[str, Any]) -> bool:
    """True when the record's knowledge was built from its gold entities (so a prompt with it leaks the spans)."""
    return any((item.get("entity_source") or "gold") == "gold" for item in record.get("knowledge") or [])


def user_text(record: dict[str, Any], config: StudentPromptConfig) -> str:
    hints = []
    if config.uses_detections():
        hints.append(detection_hint(record, config))
    if config.uses_knowledge():
        hints.append(knowledge_hint(record))
    hint_text = "".join(f"\n{h}\n" for h in hints if h)
    return load_text(config.template).format(
        image_clause=" and its image" if config.image else "",
        types=", ".join(config.types),
        frame=config.frame.describe() if config.image or config.uses_detections() else "",
        hints=hint_text,
        text=tweet_text(record),
    ).strip()


def build_messages(record: dict[str, Any], config: StudentPromptConfig) -> Messages:
    """The student's conversation for a record, up to (not including) its answer. Raises ``ValueError`` when the
    prompt needs an image the record does not have (a clear per-record error for the caller)."""
    content: list[dict[str, Any]] = []
    if config.image:
        img = record.get("image") or {}
        size = image_size(record)
        if not img.get("path") or size is None:
            raise ValueError(f"record {record.get('id')!r} has no image on disk (image.path and size are needed by a "
                             f"multimodal student prompt)")
        content.append({"type": "image", "path": img["path"], "width": size[0], "height": size[1]})
    content.append({"type": "text", "text": user_text(record, config)})
    messages: Messages = []
    if config.system:
        messages.append({"role": "system", "content": config.system})
    messages.append({"role": "user", "content": content})
    return messages


def target_answer(record: dict[str, Any], config: StudentPromptConfig,
                  triples: Sequence[Triple] | None = None) -> str:
    """The answer string in the policy's frame (gold triples by default)."""
    triples = gold_triples(record) if triples is None else list(triples)
    size = image_size(record)
    if config.frame.kind != "original" and size is not None:
        triples = [Triple(t.entity, t.type, boxes_to_frame(t.boxes, size[0], size[1], config.frame))
                   for t in triples]
    return format_answer(triples)


def target_turn(record: dict[str, Any], chain: dict[str, Any], config: StudentPromptConfig) -> str:
    """A stored chain (original pixels) as the assistant turn the student learns: every box in its frame."""
    size = image_size(record)
    think, answer = chain.get("think") or "", chain.get("answer") or ""
    if config.frame.kind != "original" and size is not None:
        think = text_to_frame(think, size[0], size[1], config.frame)
        answer = text_to_frame(answer, size[0], size[1], config.frame)
    return format_turn(think, answer)


def to_openai(messages: Messages, config: StudentPromptConfig, image_format: str = "JPEG",
              quality: int = 90) -> Messages:
    """Neutral messages -> OpenAI chat messages; each image resized to the frame's model size and inlined."""
    from .llm.config import ImageConfig
    from .llm.images import encode_image, load_image

    out: Messages = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str):
            out.append(dict(msg))
            continue
        parts = []
        for part in content:
            if part["type"] == "image":
                img = prepare_image(load_image(part["path"]), config.frame)
                # the frame decided the size; the encoder must not shrink it again
                cfg = ImageConfig(max_side=max(img.size), format=image_format, quality=quality)  # type: ignore[arg-type]
                parts.append({"type": "image_url", "image_url": {"url": encode_image(img, cfg)}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": msg["role"], "content": parts})
    return out


def to_hf(messages: Messages, config: StudentPromptConfig) -> tuple[Messages, list[Any]]:
    """Neutral messages -> (chat-template messages with ``{"type": "image"}`` placeholders, PIL images in order),
    the images resized for the frame, as Hugging Face processors take them."""
    from .llm.images import load_image

    images: list[Any] = []
    out: Messages = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content:
            if part["type"] == "image":
                images.append(prepare_image(load_image(part["path"]).convert("RGB"), config.frame))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": msg["role"], "content": parts})
    return out, images


def text_only(messages: Messages) -> Messages:
    """Messages with string content only (for text-only chat templates)."""
    out = []
    for msg in messages:
        content = msg["content"]
        if not isinstance(content, str):
            content = "\n".join(p["text"] for p in content if p["type"] == "text")
        out.append({"role": msg["role"], "content": content})
    return out


def frame_size(record: dict[str, Any], config: StudentPromptConfig) -> tuple[int, int] | None:
    """The image size the policy sees (None without an image size on the record)."""
    size = image_size(record)
    return None if size is None else model_image_size(config.frame, *size)

"""Teacher prompts (pure functions): what the llm and mllm styles send, built from prompt files in ``prompts/distill/``.

A request is ``[system, user]``:

* the **system** message is static for a style, route and frame (the task, the four constraints, the style's evidence
  and route instructions, the frame, the answer format): every request of a route starts with the same tokens, so a
  vLLM server's prefix cache serves that part once;
* the **user** message carries the record: the image first (mllm), then the tweet, the optional hints (entity
  knowledge from the knowledge stage, detector boxes from annotate), the gold annotation in the teacher's frame and in
  the seeded triple order, and the seeded order instruction.

A re-ask appends the rejected answer and a feedback message (``feedback.yaml``) to the same conversation.

Every box shown to a teacher is in its frame (``frames.to_frame``); the image sent to a ``qwen2_5_vl`` teacher is
resized by ``frames.prepare_image`` and encoded at exactly that size, as ``student.to_openai`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from gmner_pipeline.answer import DEFAULT_TYPES, Triple, format_answer
from gmner_pipeline.frames import ORIGINAL, FrameConfig, FrameError, boxes_to_frame, prepare_image
from gmner_pipeline.llm.config import ImageConfig
from gmner_pipeline.prompts import load_text, load_yaml
from gmner_pipeline.student import StudentPromptConfig, detection_hint, image_size, knowledge_hint

from .check import Verdict
from .config import ORDER_PROMPT, SYSTEM_PROMPT, USER_PROMPT, TeacherStyleConfig

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Order:
    """The seeded presentation of a record's gold triples: their order and the order of the fields."""

    triples: tuple[int, ...]
    fields: tuple[str, ...]


def system_prompt(style: str, route_file: str, frame: FrameConfig = ORIGINAL,
                  types: Sequence[str] = DEFAULT_TYPES) -> str:
    """The static part of every request of a style, route and frame."""
    return (load_text(SYSTEM_PROMPT).format(types=", ".join(types), evidence=load_text(f"distill/{style}/style.txt")
                                            .strip(), frame=frame.describe()).strip()
            + "\n\n" + load_text(route_file).strip())


def labels_in_frame(gold: Sequence[Triple], order: Order, frame: FrameConfig, size: tuple[int, int] | None) -> str:
    """The gold annotation as an answer string in the teacher's frame, triples in the seeded order."""
    ordered = [gold[i] for i in order.triples]
    if frame.kind != "original":
        if size is None:
            raise FrameError(f"a {frame.kind} frame needs the image's width and height")
        ordered = [Triple(t.entity, t.type, boxes_to_frame(t.boxes, size[0], size[1], frame)) for t in ordered]
    return format_answer(ordered)


def order_instruction(gold: Sequence[Triple], order: Order) -> str:
    phrases = load_yaml(ORDER_PROMPT)
    if not gold:
        return phrases["order_none"]
    names = [phrases["fields"][f] for f in order.fields]
    fields = ", then ".join(names)
    return phrases["order"].format(entities=", ".join(gold[i].entity for i in order.triples), fields=fields)


def hints(view: dict[str, Any], style: TeacherStyleConfig, frame: FrameConfig) -> str:
    """The optional hints (knowledge, detector boxes in the teacher's frame), worded as the student prompt words
    them (``student.knowledge_hint`` / ``detection_hint``), each followed by a line break; '' when there are none."""
    parts = []
    if style.knowledge != "never":
        parts.append(knowledge_hint(view))
    if style.detections != "never" and style.max_detections:
        parts.append(detection_hint(view, StudentPromptConfig(frame=frame, max_detections=style.max_detections)))
    return "".join(f"{p}\n" for p in parts if p)


def user_text(view: dict[str, Any], gold: Sequence[Triple], order: Order, style: TeacherStyleConfig,
              frame: FrameConfig) -> str:
    return load_text(USER_PROMPT).format(
        text=view.get("text") or "", hints=hints(view, style, frame),
        labels=labels_in_frame(gold, order, frame, image_size(view)), order=order_instruction(gold, order),
    ).strip()


def base_messages(system: str, text: str, image_url: str | None = None) -> Messages:
    """``[system, user]``; with an image, the user content is the image part first, then the text."""
    if image_url is None:
        user: dict[str, Any] = {"role": "user", "content": text}
    else:
        user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                            {"type": "text", "text": text}]}
    return [{"role": "system", "content": system}, user]


def reask_messages(base: Messages, previous: str, verdict: Verdict, feedback_template: str) -> Messages:
    """The conversation for a re-ask: the rejected answer as the assistant's turn, then what was wrong with it."""
    table = load_yaml(feedback_template)
    problem = table["problems"][verdict.reason].format(detail=verdict.detail or "")
    return [*base, {"role": "assistant", "content": previous},
            {"role": "user", "content": table["message"].format(problem=problem)}]


def encode_teacher_image(path: str, frame: FrameConfig, images: ImageConfig,
                         size: tuple[int, int] | None) -> str:
    """The image as a data URL for a teacher of this frame. For ``qwen2_5_vl`` the frame decides the size (the
    smart_resize'd image; the encoder must not shrink it again), else ``llm.images`` does. Raises ``ValueError``
    naming the file when it is missing or unreadable, or when its size is not the record's (the gold boxes would
    not fit it)."""
    from gmner_pipeline.llm.images import encode_image, load_image

    img = load_image(path)
    if size is not None and img.size != size:
        raise ValueError(f"image {path} is {img.size[0]}x{img.size[1]} but the record says {size[0]}x{size[1]}: "
                         "the gold boxes would not fit it")
    if frame.kind == "qwen2_5_vl":
        img = prepare_image(img.convert("RGB"), frame)
        images = images.model_copy(update={"max_side": max(img.size)})
    return encode_image(img, images)

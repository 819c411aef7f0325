"""What the view page knows about each record: a small index entry (what the filters read, for every record at once)
and the full detail (loaded a chunk at a time, when a page of results shows it).

Pure functions of a record. Fields the stages being built elsewhere add (knowledge 1.1's aspects, support and
per-generator answers; distill 1.1's teacher model id; grpo_filter's group statistics) are read with ``.get``: present,
they are shown; absent, the page has nothing more to say.
"""

from __future__ import annotations

from typing import Any

TEXT_IN_INDEX = 240  # characters of the tweet the search box looks in
TEMPLATE_TEACHER = "template"


def _round(box: Any) -> list[float] | None:
    if not box or len(box) != 4:
        return None
    return [round(float(v), 1) for v in box]


def teacher(chain: dict[str, Any]) -> str:
    return chain.get("model_id") or TEMPLATE_TEACHER


def grpo_outcome(record: dict[str, Any]) -> str:
    """'kept', 'dropped' or '' (not sampled): the keep/drop filter."""
    g = record.get("grpo")
    if not g:
        return ""
    return "kept" if g.get("keep") else "dropped"


def index_entry(i: int, record: dict[str, Any], thumb: bool) -> dict[str, Any]:
    chains = (record.get("cot") or {}).get("chains") or []
    reason = record.get("drop_reason") or ((record.get("grpo") or {}).get("reason") if record.get("grpo") else None)
    return {
        "i": i,
        "id": record.get("id"),
        "status": record.get("status"),
        "reason": record.get("drop_reason") or (f"error in {record.get('error_stage')}"
                                                if record.get("status") == "error" else ""),
        "styles": sorted({c.get("style") or "-" for c in chains}),
        "teachers": sorted({teacher(c) for c in chains}),
        "grpo": grpo_outcome(record),
        "grpo_reason": reason if record.get("grpo") and not (record.get("grpo") or {}).get("keep") else "",
        "dsplit": (record.get("cot") or {}).get("split") or "",
        "consistent": any(c.get("consistent") for c in chains),
        "image": thumb,
        "text": (record.get("text") or "")[:TEXT_IN_INDEX],
    }


def detail(record: dict[str, Any], thumb: str | None) -> dict[str, Any]:
    """Everything the page shows for one record (boxes in original pixels; the page scales them)."""
    img = record.get("image") or {}
    det = record.get("detections") or {}
    out: dict[str, Any] = {
        "id": record.get("id"),
        "split": record.get("split"),
        "status": record.get("status"),
        "drop_reason": record.get("drop_reason"),
        "error": record.get("error"),
        "error_stage": record.get("error_stage"),
        "text": record.get("text") or " ".join(record.get("tokens") or []),
        "grounding": record.get("grounding_labels"),
        "image": {"thumb": thumb, "width": img.get("width"), "height": img.get("height"),
                  "name": (img.get("path") or img.get("uri") or "").rsplit("/", 1)[-1] or None},
        "entities": [{"text": e.get("text"), "type": e.get("type"), "fine_type": e.get("fine_type"),
                      "boxes": [b for b in map(_round, e.get("boxes") or []) if b]}
                     for e in record.get("entities") or []],
        "detections": [{"label": d.get("label"), "score": round(float(d.get("score") or 0), 3),
                        "box": _round(d.get("box"))} for d in det.get("boxes") or [] if _round(d.get("box"))],
        "detector": det.get("model_id"),
        "knowledge": [_knowledge(k) for k in record.get("knowledge") or []],
        "chains": [{"style": c.get("style"), "route": c.get("route"), "teacher": teacher(c),
                    "consistent": bool(c.get("consistent")), "rejection": c.get("rejection"),
                    "heldout": bool(c.get("heldout")), "attempts": c.get("attempts"),
                    "think": c.get("think") or "", "answer": c.get("answer") or ""}
                   for c in (record.get("cot") or {}).get("chains") or []],
        "cot_split": (record.get("cot") or {}).get("split"),
        "cot_skipped": (record.get("cot") or {}).get("skipped"),
        "grpo": _grpo(record.get("grpo")),
    }
    return out


def _knowledge(k: dict[str, Any]) -> dict[str, Any]:
    return {
        "entity": k.get("entity"), "type": k.get("type"), "fine_type": k.get("fine_type"),
        "status": k.get("status"), "summary": k.get("knowledge") or "",
        "fine_type_support": k.get("fine_type_support") or [],
        "aspects": [{"aspect": a.get("aspect"), "text": a.get("text"), "support": a.get("support") or []}
                    for a in k.get("aspects") or []],
        "answers": [{"role": a.get("role"), "model": a.get("model_id"), "ok": a.get("ok") is not False,
                     "text": a.get("text") or "", "error": a.get("error")} for a in k.get("answers") or []],
        "voted": k.get("voted") or "",
        "notes": k.get("notes") or [],
    }


def _grpo(g: dict[str, Any] | None) -> dict[str, Any] | None:
    if not g:
        return None
    stat = {k: (None if g.get(k) is None else round(float(g[k]), 4)) for k in ("mean", "std", "max", "median")}
    return {"policy": g.get("policy_id"), "keep": g.get("keep"), "reason": g.get("reason"),
            "rewards": [None if r is None else round(float(r), 4) for r in g.get("rewards") or []],
            "responses": [r or "" for r in g.get("responses") or []], **stat}

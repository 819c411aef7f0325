"""The GRPO reward: the project's verifiable reward (``scoring.rewards``) on completions mapped back to original pixels.

The policy writes boxes in its own frame; the gold answers (the ``gold`` column) are in original pixels, where IoU is
defined (method-spec §Model coordinate frames). So every box literal of a completion is mapped back through
``frames.text_from_frame`` with the row's image size (``width`` / ``height`` columns) before scoring. Box syntaxes
other than the canonical ``[x1,y1,x2,y2]`` stay in the frame (the policy is trained to write the canonical one).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..frames import FrameConfig, text_from_frame
from ..scoring.config import RewardConfig
from ..scoring.rewards import completion_text, make_trl_reward


def project_reward(config: RewardConfig) -> Callable[..., list[float | None]]:
    """The one place the trainer builds the project's reward function (the same numbers grpo_filter computes)."""
    return make_trl_reward(config, gold_column="gold")


def to_original_pixels(text: str, width: int | None, height: int | None, frame: FrameConfig) -> str:
    if frame.kind == "original" or not width or not height:
        return text
    return text_from_frame(text, int(width), int(height), frame)


def policy_reward(config: RewardConfig, frame: FrameConfig) -> Callable[..., list[float | None]]:
    """A TRL reward function ``(prompts, completions, gold, width, height, **columns) -> list[float | None]``."""
    base = project_reward(config)

    def gmner(prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any
              ) -> list[float | None]:
        widths = columns.get("width") or [None] * len(completions)
        heights = columns.get("height") or [None] * len(completions)
        mapped = [to_original_pixels(completion_text(c), w, h, frame)
                  for c, w, h in zip(completions, widths, heights)]
        return base(prompts, mapped, **columns)

    return gmner

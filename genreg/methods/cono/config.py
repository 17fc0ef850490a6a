"""CoNo's settings: one request of the sampler (prompts, length, sampling) and the method's own knobs."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import option
from .core import video_plan

REDUCTIONS = ("mean", "sum")


@dataclass
class CoNoSettings:
    """The method's knobs, with the defaults of ``research/inference-methods.md`` §3.3 (N1 = 6, N2 = 8, T_d = 10 of
    50 steps, delta = 140), T_d kept as the share of steps (0.8) so that it holds at any step count."""

    guided_frames: int = option(
        6, "N1: frames of each new clip guided by the previous clip's last frames", place="advanced"
    )
    right_frames: int = option(
        8, "N2: frames at the end of the internal stage guided by extending stage 1", place="advanced"
    )
    look_back: float = option(
        0.8,
        "share of the steps (from the first) in which guided frames take the stored predicted noise (t >= T_d);"
        " 0 turns the look-back off",
        minimum=0.0,
        maximum=1.0,
        step=0.05,
    )
    consistency_scale: float = option(140.0, "delta: step size of the long-term consistency regularization (0: off)")
    reduction: str = option(
        "mean",
        "how the regularizer's squared error is reduced over C*H*W (the sources leave it open)",
        choices=REDUCTIONS,
    )
    consistency_steps: tuple[float, float] = option(
        (0.0, 1.0), "share of the steps [from, to) in which the regularization applies (the sources leave it open)"
    )
    internal_stage: bool = option(True, "make transition frames between clips (the internal noise prediction stage)")

    def __post_init__(self):
        if self.guided_frames < 1 or self.right_frames < 1:
            raise ValueError("guided_frames (N1) and right_frames (N2) are frame counts of at least 1")
        if not 0.0 <= self.look_back <= 1.0:
            raise ValueError(f"look_back is a share of the steps, between 0 and 1; got {self.look_back}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        start, end = self.consistency_steps
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(
                f"consistency_steps is a range of shares 0 <= from <= to <= 1; got {self.consistency_steps}"
            )
        if self.consistency_scale < 0:
            raise ValueError(f"consistency_scale (delta) cannot be negative, got {self.consistency_scale}")

    def check_clip(self, clip: int) -> None:
        """Refuses frame counts that do not fit a clip of ``clip`` frames, naming the fix."""
        if self.guided_frames >= clip or (self.internal_stage and self.guided_frames + self.right_frames >= clip):
            raise ValueError(
                f"with clips of {clip} frames, guided_frames (N1={self.guided_frames}) must stay below {clip} and "
                f"N1 + right_frames (N2={self.right_frames}) too, leaving transition frames; lower them"
            )

    def check_video(self, num_prompts: int, num_frames: int, clip: int) -> None:
        """Refuses, before anything is drawn, settings or a length that a video of ``num_prompts`` prompts on clips
        of ``clip`` frames cannot have, naming the fix."""
        self.check_clip(clip)
        video_plan(num_prompts, num_frames, clip, self.guided_frames, self.internal_stage)

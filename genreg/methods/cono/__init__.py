"""CoNo (Wang, Li, Chen, arXiv 2406.05082): tuning-free long and multi-prompt video by consistency noise injection.
``core`` holds the math (the shuffles, the consistency step), ``sampler`` runs it over stock AnimateDiff, ``config``
its settings. The official repository has no code; this follows ``research/inference-methods.md`` §3."""

from __future__ import annotations

from ...registry import Method, register
from .config import REDUCTIONS, CoNoSettings
from .core import consistency_gradient, extending_shuffle, internal_shuffle, video_plan
from .sampler import CoNoResult, CoNoSampler, Stage


def run(pipe, prompts: list[str], settings: CoNoSettings, guidance=None, clip: int = 16, **sampling) -> CoNoResult:
    """A CoNo video on AnimateDiff pipeline ``pipe``: ``sampling`` holds ``num_frames``, ``num_inference_steps``,
    ``guidance_scale``, ``negative_prompt``, ``generator``."""
    return CoNoSampler(pipe, settings, guidance, clip)(prompts, **sampling)


METHOD = register(
    Method(
        name="cono",
        kind="video",
        title="CoNo",
        help="CoNo: long and multi-prompt video without tuning, by consistency noise injection"
        " (Wang et al., arXiv 2406.05082)",
        config=CoNoSettings,
        run=run,
        command="generate-video",
        pipeline="genreg.pipelines.CoNoPipeline",
    )
)

__all__ = [
    "METHOD",
    "REDUCTIONS",
    "CoNoResult",
    "CoNoSampler",
    "CoNoSettings",
    "Stage",
    "consistency_gradient",
    "extending_shuffle",
    "internal_shuffle",
    "run",
    "video_plan",
]

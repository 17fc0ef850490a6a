"""Guide-and-Rescale (Titov et al., ECCV 2024, arXiv 2409.01322): tuning-free editing of a real image by
self-guidance with noise rescaling. ``config`` holds the settings and presets, ``energies`` the math, ``sampler``
the inversion and the guided sampling loop."""

from __future__ import annotations

import time
from dataclasses import dataclass

import PIL.Image

from ...registry import Method, register
from .config import FEATURE_LOSSES, FEATURE_PROMPTS, INVERSIONS, PRESETS, EditOptions, GuideAndRescaleConfig
from .energies import energy_gradient, feature_energy, guided_noise, rescale_factor, self_attention_energy
from .sampler import OUTPUT_TYPES, Conditions, EditOutput, check_prompts, edit, encode_conditions, run_edit


@dataclass
class EditResult:
    """The edited image, the wall time of inversion plus editing, and a line that says so."""

    image: PIL.Image.Image
    seconds: float
    summary: str


def edit_request(pipe, image, options: EditOptions, **settings) -> EditResult:
    """Serves one edit request: ``options`` (prompts, preset, steps) with ``settings`` (GuideAndRescaleConfig fields
    the user changed) over the preset."""
    start = time.perf_counter()
    out = edit(
        pipe,
        image,
        options.source_prompt,
        options.target_prompt,
        preset=options.preset,
        num_inference_steps=options.num_inference_steps,
        **settings,
    )
    seconds = time.perf_counter() - start
    summary = f"Guide-and-Rescale, preset {options.preset}, {options.num_inference_steps} steps, {seconds:.1f}s"
    return EditResult(out.images[0], seconds, summary)


METHOD = register(
    Method(
        name="guide-and-rescale",
        kind="editor",
        title="Guide-and-Rescale",
        help="edit a real image without tuning: describe it and the edit (Titov et al., ECCV 2024)",
        config=EditOptions,
        settings=GuideAndRescaleConfig,
        run=edit_request,
        command="edit",
        pipeline="genreg.pipelines.GuideAndRescalePipeline",
    )
)

__all__ = [
    "FEATURE_LOSSES",
    "FEATURE_PROMPTS",
    "INVERSIONS",
    "METHOD",
    "OUTPUT_TYPES",
    "PRESETS",
    "Conditions",
    "EditOptions",
    "EditOutput",
    "EditResult",
    "GuideAndRescaleConfig",
    "check_prompts",
    "edit",
    "edit_request",
    "encode_conditions",
    "energy_gradient",
    "feature_energy",
    "guided_noise",
    "rescale_factor",
    "run_edit",
    "self_attention_energy",
]

"""What a generate or edit request asks for, as config dataclasses: the app's forms are built from these fields.

Field metadata carries the help text (``help``) and, for forms, ``choices``, ``labels`` (what each choice is called),
``minimum``/``maximum``/``step`` (a slider) and ``lines`` (a multi-line text box). Validation lives in
``__post_init__`` and raises ValueError naming the problem, as everywhere in genreg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import require_nonnegative, require_positive_int, require_prompts
from .config import option
from .guidance import SPACES

GUIDANCES = ("cfg", "ag", "linear_ag")
GUIDANCE_LABELS = {"cfg": "CFG", "ag": "Adaptive Guidance", "linear_ag": "LinearAG"}
EDIT_PRESETS = ("local", "style")  # the presets of genreg.methods.guide_and_rescale


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is unknown; choose one of {', '.join(choices)}")


@dataclass
class GenerateOptions:
    """One text-to-image request under CFG, Adaptive Guidance or LinearAG (``AdaptiveGuidancePipeline``'s
    arguments)."""

    prompt: str = option("a red circle on the left", "what to draw", lines=2)
    negative_prompt: str = option("", "what to steer away from (empty: nothing)")
    guidance: str = option(
        "ag",
        "CFG evaluates the network twice per step; Adaptive Guidance drops the unconditional pass once the two "
        "predictions agree; LinearAG also replaces every second unconditional pass early on by a fitted estimate",
        choices=GUIDANCES,
        labels=GUIDANCE_LABELS,
    )
    guidance_scale: float = option(5.0, "classifier-free guidance scale (1 = no guidance)", minimum=0, maximum=20)
    num_inference_steps: int = option(25, "denoising steps", minimum=1, maximum=150, step=1)
    num_images: int = option(4, "images to draw for the prompt", minimum=1, maximum=16, step=1)
    seed: int = option(0, "random seed: image k starts from the noise of seed + k")
    gamma_bar: float = option(0.99, "AG: the cosine gamma_bar at which CFG ends (above 1: never, plain CFG)")
    guidance_space: str = option("x0", "AG: where the cosine of the two predictions is measured", choices=SPACES)
    min_cfg_steps: int = option(1, "AG: first steps that always get CFG", minimum=0, maximum=50, step=1)
    linear_ag_coefficients: str = option(
        "", "LinearAG: the linear_ag.json written by scripts/calibrate_adaptive_guidance.py for this model"
    )

    def __post_init__(self):
        require_prompts(self.prompt)
        _require_choice("guidance", self.guidance, GUIDANCES)
        _require_choice("guidance_space", self.guidance_space, SPACES)
        require_nonnegative("guidance_scale", self.guidance_scale)
        require_positive_int("num_inference_steps", self.num_inference_steps)
        require_positive_int("num_images", self.num_images)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if not isinstance(self.gamma_bar, (int, float)) or not math.isfinite(self.gamma_bar):
            raise ValueError(f"gamma_bar must be a finite number, got {self.gamma_bar!r}")
        if isinstance(self.min_cfg_steps, bool) or not isinstance(self.min_cfg_steps, int) or self.min_cfg_steps < 0:
            raise ValueError(f"min_cfg_steps must be a whole number >= 0, got {self.min_cfg_steps!r}")
        if self.guidance == "linear_ag":
            if not self.linear_ag_coefficients.strip():
                raise ValueError(
                    "LinearAG needs linear_ag_coefficients: the linear_ag.json that "
                    "scripts/calibrate_adaptive_guidance.py fits for this model and these settings"
                )
            if not Path(self.linear_ag_coefficients).is_file():
                raise ValueError(f"LinearAG coefficients file {self.linear_ag_coefficients!r} does not exist")

    @property
    def cfg_nfe(self) -> int:
        """Network evaluations per image that plain CFG spends on this request."""
        return self.num_inference_steps * (2 if self.guidance_scale > 1 else 1)

    def pipeline_kwargs(self, **overrides) -> dict:
        """Keyword arguments of ``AdaptiveGuidancePipeline.__call__`` (one CPU generator per image, so image k is the
        same whatever the batch size and device)."""
        kwargs = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt or None,
            "guidance": self.guidance,
            "guidance_scale": float(self.guidance_scale),
            "num_inference_steps": self.num_inference_steps,
            "num_images_per_prompt": self.num_images,
            "gamma_bar": float(self.gamma_bar),
            "guidance_space": self.guidance_space,
            "min_cfg_steps": self.min_cfg_steps,
            "linear_ag_coefficients": self.linear_ag_coefficients or None,
            "generator": [torch.Generator("cpu").manual_seed(self.seed + k) for k in range(self.num_images)],
        }
        return kwargs | overrides


@dataclass
class EditOptions:
    """One Guide-and-Rescale edit: what the image shows, what it should show, and the preset to start from."""

    source_prompt: str = option("a large red circle on the left", "the image as it is")
    target_prompt: str = option("a large blue circle on the left", "the same words, changed to say the edit")
    preset: str = option(
        "local",
        "'local' edits objects and keeps the rest; 'style' restyles the whole image",
        choices=EDIT_PRESETS,
        labels={"local": "local edit", "style": "style"},
    )
    num_inference_steps: int = option(50, "DDIM steps, for the inversion and for the edit", minimum=1, maximum=100)

    def __post_init__(self):
        require_prompts(self.source_prompt, "source prompt")
        require_prompts(self.target_prompt, "target prompt")
        _require_choice("preset", self.preset, EDIT_PRESETS)
        require_positive_int("num_inference_steps", self.num_inference_steps)

"""One text-to-image request under CFG, Adaptive Guidance or LinearAG, as the CLI and the app describe it, and the
function that serves it with any SD 1.x/2.x or SDXL pipeline."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import PIL.Image
import torch

from ...checks import require_choice, require_nonnegative, require_positive_int, require_prompts, require_seed
from ...config import option
from ...guidance import guided_call, stock_call
from ...sd import SPACES
from .policies import make_guidance

GUIDANCES = ("cfg", "ag", "linear_ag")
GUIDANCE_LABELS = {"cfg": "CFG", "ag": "Adaptive Guidance", "linear_ag": "LinearAG"}
ONE_STEP_FIELDS = ("prompt", "num_images", "seed")  # all that a one-step generator uses
ONE_STEP_ALSO_TAKES = {"num_inference_steps": (1,), "guidance_scale": (0, 1)}  # what OneStepPipeline accepts too


@dataclass
class GenerateOptions:
    """One text-to-image request under CFG, Adaptive Guidance or LinearAG (``AdaptiveGuidancePipeline``'s
    arguments)."""

    prompt: str | list[str] = option("a red circle on the left", "what to draw (several: one row each)", lines=2)
    negative_prompt: str = option("", "what to steer away from (empty: nothing)")
    guidance: str = option(
        "ag",
        "CFG evaluates the network twice per step; Adaptive Guidance drops the unconditional pass once the two "
        "predictions agree; LinearAG also replaces every second unconditional pass early on by a fitted estimate",
        choices=GUIDANCES,
        labels=GUIDANCE_LABELS,
    )
    guidance_scale: float = option(5.0, "classifier-free guidance scale (1 = no guidance)", minimum=0, maximum=20)
    num_inference_steps: int = option(25, "denoising steps", minimum=1, maximum=150, step=1, aliases=("--steps",))
    num_images: int = option(
        4, "images to draw for each prompt", minimum=1, maximum=16, step=1, aliases=("--images-per-prompt",)
    )
    seed: int = option(0, "random seed: image k starts from the noise of seed + k")
    gamma_bar: float = option(
        0.99, "AG: the cosine gamma_bar at which CFG ends (above 1: never, plain CFG)", place="advanced"
    )
    guidance_space: str = option(
        "x0", "AG: where the cosine of the two predictions is measured", choices=SPACES, place="advanced"
    )
    min_cfg_steps: int = option(
        1, "AG: first steps that always get CFG", minimum=0, maximum=50, step=1, place="advanced"
    )
    linear_ag_coefficients: str = option(
        "",
        "LinearAG: the linear_ag.json written by scripts/calibrate_adaptive_guidance.py for this model",
        place="advanced",
        label="LinearAG coefficients",
        file_types=(".json",),
    )

    def __post_init__(self):
        prompts = require_prompts(self.prompt)
        require_choice("guidance", self.guidance, GUIDANCES)
        require_choice("guidance_space", self.guidance_space, SPACES)
        require_nonnegative("guidance_scale", self.guidance_scale)
        require_positive_int("num_inference_steps", self.num_inference_steps)
        require_positive_int("num_images", self.num_images)
        require_seed(self.seed)
        require_seed(self.seed + len(prompts) * self.num_images - 1, "the last image's seed")
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
        prompts = require_prompts(self.prompt)
        n, negative = len(prompts) * self.num_images, self.negative_prompt or None
        kwargs = {
            "prompt": self.prompt,
            "negative_prompt": [negative] * len(prompts) if isinstance(self.prompt, list) and negative else negative,
            "guidance": self.guidance,
            "guidance_scale": float(self.guidance_scale),
            "num_inference_steps": self.num_inference_steps,
            "num_images_per_prompt": self.num_images,
            "gamma_bar": float(self.gamma_bar),
            "guidance_space": self.guidance_space,
            "min_cfg_steps": self.min_cfg_steps,
            "linear_ag_coefficients": self.linear_ag_coefficients or None,
            "generator": [torch.Generator("cpu").manual_seed(self.seed + k) for k in range(n)],
        }
        return kwargs | overrides


@dataclass
class SampleResult:
    """Images of one request (prompt by prompt, ``num_images`` each), the NFE spent on each, the wall time, and a
    line that says so."""

    images: list[PIL.Image.Image]
    nfe: list[int]
    seconds: float
    summary: str


def one_step_conflicts(options: GenerateOptions) -> list[str]:
    """The settings of ``options`` that a one-step generator cannot honour: any besides the prompt, the image count
    and the seed that is changed from its default (one step and a guidance scale of 0 or 1 excepted)."""
    return [
        f.name
        for f in fields(options)
        if f.name not in ONE_STEP_FIELDS
        and getattr(options, f.name) not in (f.default, *ONE_STEP_ALSO_TAKES.get(f.name, ()))
    ]


def generate_one_step(pipe, options: GenerateOptions) -> SampleResult:
    """Serves ``options`` with a one-step generator (``OneStepPipeline``): the prompt, image count and seed only."""
    conflicts = one_step_conflicts(options)
    if conflicts:
        raise ValueError(
            f"the model is a one-step generator ({type(pipe).__name__}): it draws each image in one network "
            f"evaluation, without guidance or a step count, and takes only {', '.join(ONE_STEP_FIELDS)}; "
            f"leave {', '.join(conflicts)} unset"
        )
    kwargs = options.pipeline_kwargs()
    start = time.perf_counter()
    images = pipe(
        kwargs["prompt"], num_images_per_prompt=kwargs["num_images_per_prompt"], generator=kwargs["generator"]
    ).images
    seconds = time.perf_counter() - start
    summary = f"{len(images)} images, one step (a one-step generator): 1 NFE per image, {seconds:.1f}s"
    return SampleResult(images, [1] * len(images), seconds, summary)


def generate(pipe, options: GenerateOptions) -> SampleResult:
    """Serves ``options`` with ``pipe`` (any stock SD 1.x/2.x or SDXL text-to-image pipeline) under its policy; a
    one-step generator (``OneStepPipeline``) draws with the prompt, image count and seed alone."""
    from genreg.pipelines import OneStepPipeline

    if isinstance(pipe, OneStepPipeline):  # its stock __call__ would run a multi-step sampler on the generator
        return generate_one_step(pipe, options)
    kwargs = options.pipeline_kwargs()
    policy = make_guidance(
        kwargs.pop("guidance"),
        kwargs.pop("gamma_bar"),
        kwargs.pop("guidance_space"),
        kwargs.pop("min_cfg_steps"),
        kwargs.pop("linear_ag_coefficients"),
    )
    start = time.perf_counter()
    out, nfe, _ = guided_call(stock_call(pipe), pipe, policy, kwargs.pop("prompt"), **kwargs)
    seconds = time.perf_counter() - start
    summary = (
        f"{len(out.images)} images, {options.num_inference_steps} steps, guidance {options.guidance}: "
        f"{sum(nfe) / len(nfe):.1f} NFE per image vs {options.cfg_nfe} for CFG, {seconds:.1f}s"
    )
    return SampleResult(out.images, nfe, seconds, summary)

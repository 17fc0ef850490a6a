"""Guide-and-Rescale editing pipelines for SD 1.x/2.x and SDXL (Titov et al., arXiv 2409.01322).

pipe = GuideAndRescalePipeline.from_pipe(base)
out = pipe(image, source_prompt="a red circle on the left", target_prompt="a blue circle on the left")
out.images[0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import BaseOutput

from genreg.checks import require_positive_int
from genreg.methods.guide_and_rescale import OUTPUT_TYPES, GuideAndRescaleConfig, edit
from genreg.sd import as_images, decode_latents

from .contract import StockSaveMixin


@dataclass
class GuideAndRescalePipelineOutput(BaseOutput):
    """The edited images, and the DDIM-inversion trajectory [z_0, ..., z_N] of the input images (batched per step)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    inverted_latents: list[torch.Tensor]


def _per_image(name: str, value, n: int) -> list:
    """One value per image: a single value is shared, a list must have one entry per image."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} images; pass one, or one per image")
    return values


class GuideAndRescaleMixin(StockSaveMixin):
    """Adds Guide-and-Rescale editing as ``__call__`` to a diffusers SD or SDXL pipeline (build with ``from_pipe``)."""

    _gar_callback_tensor_inputs = ("latents",)

    def __call__(
        self,
        image,
        source_prompt: str | list[str],
        target_prompt: str | list[str],
        preset: str = "local",
        *,
        config: GuideAndRescaleConfig | None = None,
        guidance_scale: float | None = None,
        self_attn_scale: float | None = None,
        feature_scale: float | None = None,
        guided_fraction: float | None = None,
        rescale_range: tuple[float, float] | None = None,
        num_inference_steps: int = 50,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **config_changes,
    ):
        """Edits ``image`` from ``source_prompt`` towards ``target_prompt``.

        Args:
            image: what diffusers' image-to-image pipelines take: a PIL image, a numpy array (uint8, uint16, or float
                in [0, 1]; HWC or NHWC), a torch tensor (CHW or NCHW, in [0, 1] or [-1, 1]), a file path, or a list
                of these. A batch is edited image by image at the first image's size.
            source_prompt, target_prompt, negative_prompt: one text, or one per image. ``negative_prompt`` replaces
                the empty prompt of CFG.
            preset: "local" (object edits) or "style" (stylisation): the official configurations.
            config: a full ``GuideAndRescaleConfig`` instead of a preset.
            guidance_scale, self_attn_scale, feature_scale, guided_fraction: override the preset's values.
            rescale_range: (lower, upper) bounds of the guider's norm relative to the CFG term's norm.
            num_inference_steps: DDIM steps, for inversion and for editing.
            height, width: output size (multiples of the model's factor); default: the image's own size, downscaled
                to 4x the model's native pixel count if larger.
            num_images_per_prompt: copies of each edit. Inversion and DDIM with eta = 0 are deterministic, so the
                copies are identical (each edit runs once).
            generator: unused, for the same reason; accepted as the stock pipelines accept it.
            callback_on_step_end: ``f(pipe, step, timestep, callback_kwargs)`` after each editing step (as diffusers);
                may return ``{"latents": ...}`` to replace them.
            callback_on_step_end_tensor_inputs: the tensors put in ``callback_kwargs``; only "latents" here.
            config_changes: any other ``GuideAndRescaleConfig`` field, e.g. ``inversion="negative-prompt"``,
                ``self_attn_levels=(1, 2)``, ``gradient_checkpointing=True``.
        """
        named = {
            "guidance_scale": guidance_scale,
            "self_attn_scale": self_attn_scale,
            "feature_scale": feature_scale,
            "guided_fraction": guided_fraction,
        }
        changes = {k: v for k, v in named.items() if v is not None} | config_changes
        if rescale_range is not None:
            if len(rescale_range) != 2:
                raise ValueError(f"rescale_range must be (lower, upper), got {rescale_range!r}")
            changes |= {"rescale_lower": rescale_range[0], "rescale_upper": rescale_range[1]}
        require_positive_int("num_images_per_prompt", num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._gar_callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available in Guide-and-Rescale; it passes "
                f"{list(self._gar_callback_tensor_inputs)}"
            )
        images = as_images(image)
        prompts = zip(
            _per_image("source_prompt", source_prompt, len(images)),
            _per_image("target_prompt", target_prompt, len(images)),
            _per_image("negative_prompt", negative_prompt, len(images)),
            strict=True,
        )

        callback = None
        if callback_on_step_end is not None:

            def callback(i, t, latents):
                tensors = {name: latents for name in callback_on_step_end_tensor_inputs}
                returned = callback_on_step_end(self, i, t, tensors)
                return returned.get("latents") if isinstance(returned, dict) else None

        edits = []
        for im, (source, target, negative) in zip(images, prompts, strict=True):
            edits.append(
                edit(
                    self,
                    im,
                    source,
                    target,
                    preset=preset,
                    config=config,
                    num_inference_steps=num_inference_steps,
                    height=height,
                    width=width,
                    output_type="latent",
                    callback=callback,
                    negative_prompt=negative,
                    **changes,
                )
            )
            height, width = (side * self.vae_scale_factor for side in edits[0].latents.shape[-2:])
        latents = torch.cat([e.latents for e in edits]).repeat_interleave(num_images_per_prompt, dim=0)
        inverted = [torch.cat(step) for step in zip(*(e.inverted for e in edits), strict=True)]
        result = GuideAndRescalePipelineOutput(
            images=decode_latents(self, latents, output_type), inverted_latents=inverted
        )
        return result if return_dict else result.to_tuple()


class GuideAndRescalePipeline(GuideAndRescaleMixin, StableDiffusionPipeline):
    """SD 1.x / 2.x (epsilon or v-prediction) real-image editing with Guide-and-Rescale."""


class GuideAndRescaleXLPipeline(GuideAndRescaleMixin, StableDiffusionXLPipeline):
    """SDXL real-image editing with Guide-and-Rescale."""

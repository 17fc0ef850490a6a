"""Stable Diffusion plumbing every method shares (SD 1.x/2.x and SDXL): prediction types, images <-> latents,
prompt conditions and batched UNet calls, each done once and exactly as the stock diffusers pipelines do it."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import PIL.Image
import torch

from .io import load_image, to_rgb

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACES = ("epsilon", "x0", "v")  # parameterisations a prediction can be expressed in (``to_space``)


# ---------------------------------------------------------------------------------------------------------------------
# Prediction types


def check_prediction_type(kind: str) -> str:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")
    return kind


def to_space(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str, space: str):
    """Converts a network prediction (epsilon or v) at x_t into the epsilon, x0 or v parameterisation."""
    a, s = alpha_bar.sqrt().to(pred), (1 - alpha_bar).sqrt().to(pred)
    eps = pred if check_prediction_type(prediction_type) == "epsilon" else a * pred + s * x_t
    if space == "epsilon":
        return eps
    x0 = (x_t - s * eps) / a
    if space == "x0":
        return x0
    if space == "v":
        return a * eps - s * x0
    raise ValueError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")


def epsilon_shift_as_prediction(shift: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """A shift d of epsilon at fixed x_t, as a shift of the network's own prediction: d for epsilon, d / sqrt(a)
    for v (v = (eps - sqrt(1 - a) x_t) / sqrt(a))."""
    if check_prediction_type(prediction_type) == "epsilon":
        return shift
    return shift / alpha_bar.to(shift.device, torch.float32).sqrt().to(shift.dtype)


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network is trained to predict at ``t``: epsilon, or v = sqrt(a) eps - sqrt(1 - a) x0."""
    if check_prediction_type(scheduler.config.prediction_type) == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, t)


# ---------------------------------------------------------------------------------------------------------------------
# Images <-> latents


def is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the diffusion model's latents: per-channel ``latents_mean``/``latents_std`` where the VAE
    config has them (SDXL-style), else ``shift_factor`` and ``scaling_factor`` (SD, SD3)."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        return (latents - mean) * config.scaling_factor / std
    return (latents - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of ``scale_latents``: what the VAE decoder takes."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)


def _array_images(array: np.ndarray) -> list[PIL.Image.Image]:
    """(H, W), (H, W, C) or (N, H, W, C) uint8, uint16 or float-in-[0, 1] pixels as PIL images."""
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        array = array[None]
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"an image array must be (H, W), (H, W, C) or (N, H, W, C) with C 1, 3 or 4; got {array.shape}"
        )
    if array.dtype == np.uint16:
        array = (array / 257).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError("a float image must hold finite values in [0, 1] (diffusers' convention)")
        array = (array * 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8, uint16 or float in [0, 1], not {array.dtype}")
    return [PIL.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]


def as_images(image) -> list[PIL.Image.Image]:
    """diffusers' image inputs as RGB PIL images: a PIL image, a file path, a numpy array (see ``_array_images``), a
    torch tensor (C, H, W) or (N, C, H, W) in [0, 1], or in [-1, 1] when it has negative values, or a list of them."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("the image list is empty")
        return [im for item in image for im in as_images(item)]
    if isinstance(image, (str, os.PathLike)):
        return [load_image(image)]
    if isinstance(image, PIL.Image.Image):
        return [to_rgb(image)]
    if isinstance(image, torch.Tensor):
        pixels = image.detach().float().cpu()
        pixels = pixels[None] if pixels.ndim == 3 else pixels
        if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
            raise ValueError(
                f"an image tensor must be (C, H, W) or (N, C, H, W) with 1 or 3 channels, got {tuple(image.shape)}"
                " (4-channel tensors are latents to diffusers; pass the image instead)"
            )
        if pixels.min() < 0:
            pixels = (pixels + 1) / 2
        return _array_images(pixels.permute(0, 2, 3, 1).numpy())
    if isinstance(image, np.ndarray):
        return [to_rgb(im) for im in _array_images(image)]
    raise ValueError(
        "image must be a PIL image, a numpy array, a torch tensor, the path of an image file, or a list of these; "
        f"got {type(image).__name__}"
    )


def native_size(pipe) -> int:
    """The image side the model was trained at: the UNet's sample size times the VAE's factor."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def prepare_image(
    image, multiple: int, height: int | None = None, width: int | None = None, max_pixels: int | None = None
) -> PIL.Image.Image:
    """An RGB image whose sides are multiples of ``multiple``: ``height`` x ``width`` if given, else the image's own
    size rounded to the nearest multiple, downscaled (aspect kept) to at most ``max_pixels`` (with warnings)."""
    images = as_images(image)
    if len(images) != 1:
        raise ValueError(f"expected one image, got {len(images)}")
    image = images[0]
    for name, value in (("height", height), ("width", width)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple
        ):
            raise ValueError(f"{name} must be a positive multiple of {multiple} for this model, got {value!r}")
    if min(image.size) < multiple:
        raise ValueError(
            f"the image is {image.width}x{image.height}; this model needs sides of at least {multiple} pixels"
        )
    shrink = 1.0
    if max_pixels and height is None and width is None and image.width * image.height > max_pixels:
        shrink = math.sqrt(max_pixels / (image.width * image.height))
        logger.warning(
            "the image is %dx%d, above this model's limit of %d pixels (4x its native size): it is downscaled; pass "
            "height and width to choose the size",
            *image.size,
            max_pixels,
        )

    def side(pixels: int) -> int:  # the nearest multiple, or the next lower one when shrinking to the limit
        scaled = pixels * shrink / multiple
        return max(multiple, (round(scaled) if shrink == 1 else math.floor(scaled)) * multiple)

    size = (width or side(image.width), height or side(image.height))
    if size != image.size:
        logger.warning(
            "resizing the image from %dx%d to %dx%d (sides must be multiples of %d for this model)",
            *image.size,
            *size,
            multiple,
        )
        image = image.resize(size, PIL.Image.Resampling.LANCZOS)
    return image


@contextmanager
def vae_precision(pipe) -> Iterator[None]:
    """Runs SDXL's fp16 VAE in fp32 when its config asks for it (as the SDXL pipelines do), then puts it back."""
    vae = pipe.vae
    upcast = is_sdxl(pipe) and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(torch.float16)


@torch.no_grad()
def encode_image(pipe, image: PIL.Image.Image) -> torch.Tensor:
    """The image's latent: the VAE posterior's mean, scaled as the pipeline's latents are."""
    pixels = pipe.image_processor.preprocess(image).to(pipe._execution_device)
    with vae_precision(pipe):
        latents = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mean
    return scale_latents(pipe.vae, latents).to(pipe.unet.dtype)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, output_type: str = "pil"):
    """Latents to images of ``output_type`` ("pil", "np", "pt"; "latent" returns them as they are)."""
    if output_type == "latent":
        return latents
    latents = unscale_latents(pipe.vae, latents)
    with vae_precision(pipe):
        images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type=output_type)


# ---------------------------------------------------------------------------------------------------------------------
# Prompt conditions and UNet calls


@torch.no_grad()
def text_conditions(
    pipe, prompts: list[str], height: int, width: int, negative_prompt: str | None = None
) -> list[dict]:
    """UNet keyword arguments (one batch row each) of the unconditional prompt (``negative_prompt``, default empty),
    then of each of ``prompts``, encoded as the stock pipeline encodes them (SD or SDXL, whose micro-conditioning
    uses ``height`` x ``width``)."""
    device = pipe._execution_device
    if not is_sdxl(pipe):
        first, uncond = pipe.encode_prompt(prompts[0], device, 1, True, negative_prompt=negative_prompt)
        rest = [pipe.encode_prompt(p, device, 1, False)[0] for p in prompts[1:]]
        return [{"encoder_hidden_states": e} for e in (uncond, first, *rest)]
    first, uncond, first_pooled, uncond_pooled = pipe.encode_prompt(
        prompts[0],
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=negative_prompt,
    )
    rows = [(uncond, uncond_pooled), (first, first_pooled)]
    for p in prompts[1:]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            p, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        rows.append((embeds, pooled))
    # SDXL micro-conditioning: original size, crop top-left, target size.
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=first.dtype, device=device)
    return [
        {"encoder_hidden_states": e, "added_cond_kwargs": {"text_embeds": p, "time_ids": time_ids}} for e, p in rows
    ]


def batch_conditions(rows: list[dict]) -> dict:
    """One keyword-argument dict whose tensors stack ``rows``' (nested dicts alike)."""
    if len(rows) == 1:
        return rows[0]
    out = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = batch_conditions([r[key] for r in rows])
        else:
            out[key] = torch.cat([r[key] for r in rows])
    return out


def predict(unet, latents: torch.Tensor, t: torch.Tensor, rows: list[dict]) -> torch.Tensor:
    """The UNet's prediction at ``latents`` (one sample) under each of ``rows``' conditions, batched."""
    sample = torch.cat([latents] * len(rows)) if len(rows) > 1 else latents
    return unet(sample, t, return_dict=False, **batch_conditions(rows))[0]

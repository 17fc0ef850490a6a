"""Guide-and-Rescale (Titov et al., ECCV 2024, arXiv 2409.01322): tuning-free editing of a real image.

``edit(pipe, image, source_prompt, target_prompt, preset="local")`` inverts the image with DDIM under the source prompt
(no CFG), then samples from the inverted latent with CFG towards the target prompt plus the gradient of self-guidance
energies. The energies compare the current sample's pass with the reference pass on the inverted trajectory, both
under the source prompt: self-attention maps (eq. 11) and features of a UNet block (eq. 12; eq. 13 with the target
prompt's pass for stylisation). The guider's gradient is rescaled so its norm stays within [lower, upper] x the CFG
term's norm, and only acts on the first part of the steps. ``inversion="negative-prompt"`` (the official code's
``npinv``) runs CFG against the source prompt instead of the empty one.

Where paper and official code differ, genreg follows the code: plain (not squared) L2 norms in the rescaling, and
30 of 50 guided steps for ``local`` (kept as the fraction 0.6, so any step count works). Unlike the code, only the
selected self-attention layers record, and they keep queries and keys (the maps are rebuilt in chunks inside the
energy), energies are computed in fp32 (and the backward loss-scaled with an fp16 model), a pass runs only when
something reads it, and the model's processors, hooks, ``requires_grad`` flags and gradient-checkpointing state are
restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import numpy as np
import PIL.Image
import torch

from ...attention import AttentionRecorder, recording, select_layers
from ...checks import require_positive_int
from ...inversion import ddim_invert, required_ddim
from ...sd import (
    decode_latents,
    encode_image,
    epsilon_shift_as_prediction,
    native_size,
    predict,
    prepare_image,
    size_multiple,
    text_conditions,
)
from .config import GuideAndRescaleConfig, check_prompts
from .energies import energy_gradient, feature_energy, guided_noise, self_attention_energy

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class Conditions:
    """UNet keyword arguments (one batch row each) of the unconditional, source and target prompts."""

    uncond: dict
    source: dict
    target: dict


def encode_conditions(
    pipe, source: str, target: str, height: int, width: int, negative_prompt: str | None = None
) -> Conditions:
    """The three prompts' conditions (the unconditional one from ``negative_prompt``, default empty), encoded as the
    stock pipeline encodes them (SD or SDXL)."""
    uncond, target_row, source_row = text_conditions(pipe, [target, source], height, width, negative_prompt)
    return Conditions(uncond=uncond, source=source_row, target=target_row)


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    module = model
    for part in path.split("."):
        try:
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
        except (AttributeError, IndexError, TypeError, KeyError):
            module = None
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"feature_layer {path!r} is not a module of this UNet (e.g. 'up_blocks.-1')")
    return module


class _OutputCapture:
    """Keeps a module's output (chosen batch rows) while capturing; its hook lives while the object is entered."""

    def __init__(self, module: torch.nn.Module | None):
        self.module, self.handle = module, None
        self.active, self.rows, self.value = False, None, None

    def __enter__(self) -> _OutputCapture:
        if self.module is not None:
            self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()

    def _hook(self, module, args, output):
        if self.active:
            output = output[0] if isinstance(output, tuple) else output
            self.value = output if self.rows is None else output[self.rows]

    @contextmanager
    def capture(self, rows: slice | None = None) -> Iterator[None]:
        self.active, self.rows = True, rows
        try:
            yield
        finally:
            self.active = False

    def take(self) -> torch.Tensor | None:
        value, self.value = self.value, None
        return value


@contextmanager
def _grad_setup(unet, gradient_checkpointing: bool) -> Iterator[None]:
    """Weights out of the graph (the guider needs d/dz only) and optional checkpointing; both restored after."""
    flags = [p.requires_grad for p in unet.parameters()]
    switch = gradient_checkpointing and not unet.is_gradient_checkpointing
    try:
        unet.requires_grad_(False)
        if switch:
            unet.enable_gradient_checkpointing()
        yield
    finally:
        for p, flag in zip(unet.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        if switch:
            unet.disable_gradient_checkpointing()


def run_edit(
    unet,
    scheduler,
    trajectory: list[torch.Tensor],
    conditions: Conditions,
    config: GuideAndRescaleConfig,
    callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """GaR sampling from the inverted latent ``trajectory[-1]`` along ``scheduler.timesteps`` (DDIM, eta = 0).

    Per guided step: the reference pass (inverted latent, source prompt, recording), the unconditional and target
    passes, and the current pass (source prompt, and the target prompt when a stylisation guider reads it) with
    gradient to the latent. After the guided steps, plain CFG: two passes, batched as diffusers does.
    ``callback(i, t, latents)`` runs after each step and may return replacement latents."""
    n = len(scheduler.timesteps)
    if len(trajectory) != n + 1:
        raise ValueError(f"the inverted trajectory has {len(trajectory)} latents; {n} steps need {n + 1}")
    if config.inversion == "negative-prompt":  # NPI: the source prompt stands in for the empty one (Miyake et al.)
        conditions = replace(conditions, uncond=conditions.source)
    guided_steps = config.guided_steps(n)
    use_attn = config.self_attn_scale > 0 and guided_steps > 0
    use_feat = config.feature_scale > 0 and guided_steps > 0
    target_in_grad = use_feat and config.feature_prompt == "target"
    grad_rows = [conditions.source] if use_attn or (use_feat and not target_in_grad) else []
    grad_rows += [conditions.target] if target_in_grad else []
    feature_row = slice(len(grad_rows) - 1, len(grad_rows)) if target_in_grad else slice(0, 1)
    layers = select_layers(unet, "self", config.self_attn_blocks, config.self_attn_levels) if use_attn else []
    recorder = AttentionRecorder(keep="qk", grad=True)
    loss_scale = [2.0**16]  # fp16 only; kept from step to step once it has backed off
    features = _OutputCapture(_submodule(unet, config.feature_layer) if use_feat else None)
    w = config.guidance_scale

    def guided_step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            with recorder.capture(), features.capture():
                predict(unet, trajectory[n - i], t, [conditions.source])  # the reference pass
            reference, reference_features = recorder.take(), features.take()
            if target_in_grad:  # the target prediction comes from the gradient pass below
                uncond = predict(unet, latents, t, [conditions.uncond])
            else:
                uncond, target = predict(unet, latents, t, [conditions.uncond, conditions.target]).chunk(2)
        z = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            with recorder.capture(rows=slice(0, 1)), features.capture(rows=feature_row):
                out = predict(unet, z, t, grad_rows)  # the current pass(es)
            energy = torch.zeros((), device=z.device)
            if use_attn:
                energy = energy + config.self_attn_scale * self_attention_energy(
                    reference, recorder.take(), config.chunk_size
                )
            if use_feat:
                energy = energy + config.feature_scale * feature_energy(
                    reference_features, features.take(), config.feature_loss
                )
        grad, loss_scale[0] = energy_gradient(energy, z, loss_scale[0])
        if target_in_grad:
            target = out[-1:].detach()
        guider = epsilon_shift_as_prediction(grad, scheduler.alphas_cumprod[int(t)], scheduler.config.prediction_type)
        return guided_noise(uncond, target, guider, w, config.rescale_lower, config.rescale_upper)

    latents = trajectory[-1]
    with ExitStack() as stack:
        stack.enter_context(recording(unet, layers, recorder))
        stack.enter_context(features)
        if guided_steps:
            stack.enter_context(_grad_setup(unet, config.gradient_checkpointing))
        for i, t in enumerate(scheduler.timesteps):
            if i < guided_steps:
                noise_pred = guided_step(i, t, latents)
            else:  # plain CFG, computed exactly as the stock pipelines do
                with torch.no_grad():
                    noise_pred_uncond, noise_pred_text = predict(
                        unet, latents, t, [conditions.uncond, conditions.target]
                    ).chunk(2)
                noise_pred = noise_pred_uncond + w * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback is not None and (changed := callback(i, t, latents)) is not None:
                latents = changed
    return latents


@dataclass
class EditOutput:
    """The edited images, their final latents, and the DDIM-inversion trajectory [z_0, ..., z_N] they started from."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    latents: torch.Tensor
    inverted: list[torch.Tensor]


def edit(
    pipe,
    image,
    source_prompt: str,
    target_prompt: str,
    preset: str = "local",
    config: GuideAndRescaleConfig | None = None,
    num_inference_steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "pil",
    callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    negative_prompt: str | None = None,
    **changes,
) -> EditOutput:
    """Edits ``image`` (described by ``source_prompt``) towards ``target_prompt`` with any SD 1.x/2.x or SDXL pipeline.

    ``config`` (default: the ``preset``) with ``changes`` applied, e.g. ``guidance_scale=5.0``. The pipeline's
    scheduler config (noise schedule, spacing, ``steps_offset``, prediction type) is used with DDIM, eta = 0; the
    pipeline and its models are left as they were. ``negative_prompt`` replaces the empty prompt of CFG. An image above
    4x the model's native pixel count is downscaled to it unless ``height`` and ``width`` are given."""
    missing = [a for a in ("unet", "vae", "encode_prompt", "image_processor") if getattr(pipe, a, None) is None]
    if missing:
        raise ValueError(
            f"Guide-and-Rescale needs an SD 1.x/2.x or SDXL pipeline; {type(pipe).__name__} lacks {', '.join(missing)}"
        )
    config = config.changed(**changes) if config is not None else GuideAndRescaleConfig.preset(preset, **changes)
    source, target = check_prompts(source_prompt, target_prompt)
    require_positive_int("num_inference_steps", num_inference_steps)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    if negative_prompt is not None:
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be one text prompt, not {type(negative_prompt).__name__}")
        if config.inversion == "negative-prompt":
            raise ValueError(
                "negative-prompt inversion uses the source prompt as CFG's negative prompt; drop negative_prompt or "
                "use inversion='ddim'"
            )
    image = prepare_image(image, size_multiple(pipe), height, width, max_pixels=4 * native_size(pipe) ** 2)
    scheduler = required_ddim(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps, device=pipe._execution_device)
    conditions = encode_conditions(pipe, source, target, image.height, image.width, negative_prompt)
    latents = encode_image(pipe, image)
    with pipe.progress_bar(total=2 * num_inference_steps) as bar:
        trajectory = ddim_invert(
            lambda z, t: predict(pipe.unet, z, t, [conditions.source]),
            latents,
            scheduler,
            callback=lambda k, z: bar.update(),
        )

        def step_done(i, t, z):
            bar.update()
            return callback(i, t, z) if callback is not None else None

        edited = run_edit(pipe.unet, scheduler, trajectory, conditions, config, callback=step_done)
    images = decode_latents(pipe, edited, output_type)
    pipe.maybe_free_model_hooks()
    return EditOutput(images=images, latents=edited, inverted=trajectory)

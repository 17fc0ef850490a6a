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

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields, replace

import numpy as np
import PIL.Image
import torch

from ..attention import AttentionRecord, AttentionRecorder, attention_map_energy, recording, select_layers
from ..checks import require_positive_int
from ..inversion import ddim_invert, ddim_scheduler
from ..io import load_image

logger = logging.getLogger(__name__)

FEATURE_LOSSES = ("l1", "l2")
FEATURE_PROMPTS = ("source", "target")
INVERSIONS = ("ddim", "negative-prompt")


@dataclass(frozen=True)
class GuideAndRescaleConfig:
    """Settings of one GaR edit; ``GuideAndRescaleConfig.preset("local" | "style", **changes)`` starts from the
    official configurations."""

    guidance_scale: float = field(default=7.5, metadata={"help": "CFG scale w towards the target prompt"})
    self_attn_scale: float = field(
        default=300_000.0, metadata={"help": "weight of the self-attention energy (v_self; 0 turns it off)"}
    )
    feature_scale: float = field(default=500.0, metadata={"help": "weight of the feature energy (v_feat; 0 = off)"})
    guided_fraction: float = field(
        default=0.6, metadata={"help": "fraction of the steps, from the first, on which the guiders act"}
    )
    rescale_lower: float = field(
        default=0.33, metadata={"help": "least norm of the guider term, as a multiple of the CFG term's norm"}
    )
    rescale_upper: float = field(
        default=3.0, metadata={"help": "largest norm of the guider term, as a multiple of the CFG term's norm"}
    )
    feature_layer: str = field(
        default="up_blocks.-1", metadata={"help": "UNet module whose output the feature energy compares"}
    )
    feature_loss: str = field(
        default="l1", metadata={"help": "feature energy: 'l1' (local edits) or 'l2' (style)", "choices": ("l1", "l2")}
    )
    feature_prompt: str = field(
        default="source",
        metadata={
            "help": "prompt of the current feature pass: 'source', or 'target' (stylisation)",
            "choices": ("source", "target"),
        },
    )
    self_attn_blocks: tuple[str, ...] = field(
        default=("down", "mid", "up"), metadata={"help": "UNet blocks whose self-attention is compared"}
    )
    self_attn_levels: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "resolution levels compared (0 = the latent's; 1 = half; ...); leaving out 0 saves memory"},
    )
    inversion: str = field(
        default="ddim",
        metadata={
            "help": "'ddim': CFG against the empty prompt (official best configs); 'negative-prompt': negative-prompt "
            "inversion (the official code's npinv), CFG against the source prompt, so unedited content follows the "
            "inversion",
            "choices": INVERSIONS,
        },
    )
    chunk_size: int = field(default=256, metadata={"help": "query rows per chunk of the self-attention energy"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute UNet activations in the guider's backward to save memory"}
    )

    def __post_init__(self):
        for name in (
            "guidance_scale",
            "self_attn_scale",
            "feature_scale",
            "guided_fraction",
            "rescale_lower",
            "rescale_upper",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.guided_fraction > 1:
            raise ValueError(f"guided_fraction must be within [0, 1], got {self.guided_fraction!r}")
        if self.rescale_lower > self.rescale_upper:
            raise ValueError(
                f"rescale_lower ({self.rescale_lower}) must not exceed rescale_upper ({self.rescale_upper})"
            )
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"unknown feature_loss {self.feature_loss!r}; choose one of {', '.join(FEATURE_LOSSES)}")
        if self.feature_prompt not in FEATURE_PROMPTS:
            raise ValueError(f"unknown feature_prompt {self.feature_prompt!r}; choose 'source' or 'target'")
        if self.inversion not in INVERSIONS:
            raise ValueError(f"unknown inversion {self.inversion!r}; choose one of {', '.join(INVERSIONS)}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive whole number, got {self.chunk_size!r}")
        if not self.self_attn_blocks or any(not isinstance(b, str) or not b for b in self.self_attn_blocks):
            raise ValueError(
                f"self_attn_blocks must name blocks, e.g. ('down', 'mid', 'up'); got {self.self_attn_blocks}"
            )
        if self.self_attn_levels is not None and any(
            isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.self_attn_levels
        ):
            raise ValueError(f"self_attn_levels must be whole numbers >= 0, got {self.self_attn_levels}")

    @classmethod
    def preset(cls, name: str, **changes) -> GuideAndRescaleConfig:
        """A preset (``"local"`` or ``"style"``) with ``changes`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name].changed(**changes)

    def changed(self, **changes) -> GuideAndRescaleConfig:
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown GaR setting(s) {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    @property
    def guides(self) -> bool:
        """Whether any guider can act (otherwise an edit is inversion + plain CFG)."""
        return (self.self_attn_scale > 0 or self.feature_scale > 0) and self.rescale_upper > 0

    def guided_steps(self, num_steps: int) -> int:
        """Steps, from the first, on which the guiders act (the paper's tau), rounded half up."""
        return math.floor(self.guided_fraction * num_steps + 0.5) if self.guides else 0


PRESETS: dict[str, GuideAndRescaleConfig] = {
    # Official non-stylisation config (paper App. A scales; the code's 30 of 50 guided steps; range rescaling).
    "local": GuideAndRescaleConfig(),
    # Official stylisation config: L2 features of up_blocks[1].resnets[1] from the target pass; fixed 1.5 rescaling.
    "style": GuideAndRescaleConfig(
        self_attn_scale=100_000.0,
        feature_scale=2.5,
        guided_fraction=0.5,
        rescale_lower=1.5,
        rescale_upper=1.5,
        feature_layer="up_blocks.1.resnets.1",
        feature_loss="l2",
        feature_prompt="target",
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# The method's math


def self_attention_energy(
    reference: dict[str, list[AttentionRecord]], current: dict[str, list[AttentionRecord]], chunk_size: int = 256
) -> torch.Tensor:
    """g_self = sum_l mean_{h,i,j} (A*_l - A_l)^2 over the recorded self-attention layers l (eq. 11), in fp32."""
    terms = [
        attention_map_energy(ref.query, ref.key, cur.query, cur.key, ref.scale, chunk_size)
        / (ref.query.shape[:-1].numel() * ref.key.shape[-2])  # the mean over heads x L x L entries
        for name, records in reference.items()
        for ref, cur in zip(records, current[name], strict=True)
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def feature_energy(reference: torch.Tensor, current: torch.Tensor, loss: str = "l1") -> torch.Tensor:
    """g_feat = mean |Phi* - Phi| (eq. 12, local edits) or mean (Phi* - Phi)^2 (eq. 13, stylisation), in fp32."""
    diff = reference.float() - current.float()
    return diff.abs().mean() if loss == "l1" else diff.square().mean()


def rescale_factor(guider: torch.Tensor, cfg_term: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """gamma = clip(r, lower, upper) / r with r = ||grad g|| / ||w (eps_trg - eps_0)||, per sample (eqs. 15-16).

    Plain L2 norms, as the official code computes them (the paper's eq. 15 squares them); gamma = 1 where either norm
    is 0, as in the code."""
    g = guider.float().flatten(1).norm(dim=1)
    c = cfg_term.float().flatten(1).norm(dim=1)
    ratio = g / c.clamp_min(torch.finfo(torch.float32).tiny)
    gamma = torch.where((g > 0) & (c > 0), ratio.clamp(lower, upper) / ratio.clamp_min(1e-30), torch.ones_like(g))
    return gamma.view(-1, *([1] * (guider.ndim - 1)))


def guided_noise(
    uncond: torch.Tensor, target: torch.Tensor, guider: torch.Tensor, w: float, lower: float, upper: float
) -> torch.Tensor:
    """eps = eps(z, 0) + w (eps(z, y_trg) - eps(z, 0)) + gamma grad_z g (Alg. 1, with the rescaling above).

    Summed in fp32 (an fp16 guider is mostly subnormal before rescaling) and returned in the predictions' dtype."""
    cfg_term = w * (target.float() - uncond.float())
    gamma = rescale_factor(guider, cfg_term, lower, upper)
    return (uncond.float() + cfg_term + gamma * guider.float()).to(uncond.dtype)


def energy_gradient(energy: torch.Tensor, z: torch.Tensor, scale: float = 2.0**16) -> tuple[torch.Tensor, float]:
    """grad_z g in fp32, and the loss scale that worked. With an fp16 model the backward runs on ``scale`` x energy,
    as mixed-precision training scales its losses, since GaR's gradients (~1e-7 at the attention maps of a 64x64
    layer) lie below fp16's normal range; on overflow the scale backs off and the backward is repeated."""
    if z.dtype != torch.float16:
        return torch.autograd.grad(energy, z)[0].float(), 1.0
    while True:
        (grad,) = torch.autograd.grad(energy * scale, z, retain_graph=scale > 1)
        if torch.isfinite(grad).all() or scale <= 1:
            return grad.float() / scale, scale
        scale /= 2.0**4


def guider_in_prediction_space(grad: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The energy gradient, which GaR adds to epsilon, as a shift of the network's own prediction.

    For v-prediction v = (eps - sqrt(1 - a) z) / sqrt(a) at fixed z, so a shift d of eps is d / sqrt(a) of v; the CFG
    term scales alike, so the rescaling ratio is the same in either space."""
    if prediction_type == "epsilon":
        return grad
    if prediction_type == "v_prediction":
        return grad / alpha_bar.to(grad.device, torch.float32).sqrt().to(grad.dtype)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")


# ---------------------------------------------------------------------------------------------------------------------
# The sampling loop


@dataclass
class Conditions:
    """UNet keyword arguments (one batch row each) of the unconditional, source and target prompts."""

    uncond: dict
    source: dict
    target: dict


def _batch(rows: list[dict]) -> dict:
    if len(rows) == 1:
        return rows[0]
    out = {}
    for key, value in rows[0].items():
        if isinstance(value, dict):
            out[key] = _batch([r[key] for r in rows])
        else:
            out[key] = torch.cat([r[key] for r in rows])
    return out


def predict(unet, latents: torch.Tensor, t: torch.Tensor, rows: list[dict]) -> torch.Tensor:
    """The UNet's prediction at ``latents`` (one sample) under each of ``rows``' conditions, batched."""
    sample = torch.cat([latents] * len(rows)) if len(rows) > 1 else latents
    return unet(sample, t, return_dict=False, **_batch(rows))[0]


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
        guider = guider_in_prediction_space(grad, scheduler.alphas_cumprod[int(t)], scheduler.config.prediction_type)
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


# ---------------------------------------------------------------------------------------------------------------------
# Editing with a diffusers pipeline (SD 1.x/2.x and SDXL)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def prepare_image(image, multiple: int, height: int | None = None, width: int | None = None) -> PIL.Image.Image:
    """An RGB image whose sides are multiples of ``multiple``: ``height`` x ``width`` if given, else the image's own
    size rounded to the nearest multiple (resized, with a warning, when that changes it)."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                f"a numpy image must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} {image.shape}"
            )
        image = PIL.Image.fromarray(image)
    elif not isinstance(image, PIL.Image.Image):
        raise ValueError(
            f"image must be a PIL image, a uint8 numpy array or the path of an image file, not {type(image).__name__}"
        )
    if image.mode != "RGB":
        logger.info("converting the %s-mode image to RGB", image.mode)
        image = image.convert("RGB")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple
        ):
            raise ValueError(f"{name} must be a positive multiple of {multiple} for this model, got {value!r}")
    if min(image.size) < multiple:
        raise ValueError(
            f"the image is {image.width}x{image.height}; this model needs sides of at least {multiple} pixels"
        )
    size = (
        width or max(multiple, round(image.width / multiple) * multiple),
        height or max(multiple, round(image.height / multiple) * multiple),
    )
    if size != image.size:
        logger.warning(
            "resizing the image from %dx%d to %dx%d (sides must be multiples of %d for this model)",
            *image.size,
            *size,
            multiple,
        )
        image = image.resize(size, PIL.Image.Resampling.LANCZOS)
    return image


def check_prompts(source_prompt, target_prompt) -> tuple[str, str]:
    """Both prompts as text; refuses empty ones and a target that repeats the source (there is nothing to edit)."""
    for name, prompt, hint in (
        ("source_prompt", source_prompt, "describe the image as it is, e.g. 'a red circle on the left'"),
        ("target_prompt", target_prompt, "describe the edited image, e.g. 'a blue circle on the left'"),
    ):
        if not isinstance(prompt, str):
            raise ValueError(f"{name} must be one text prompt, not {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"{name} is empty: {hint}")
    if " ".join(source_prompt.split()).lower() == " ".join(target_prompt.split()).lower():
        raise ValueError(
            "source_prompt and target_prompt are the same, so there is nothing to edit: change the target prompt "
            "to describe the edited image"
        )
    return source_prompt, target_prompt


@torch.no_grad()
def encode_conditions(pipe, source: str, target: str, height: int, width: int) -> Conditions:
    """Text conditions for the three prompts, encoded as the stock pipeline encodes them (SD or SDXL)."""
    device = pipe._execution_device
    if not is_sdxl(pipe):
        target_embeds, uncond_embeds = pipe.encode_prompt(target, device, 1, True)
        source_embeds = pipe.encode_prompt(source, device, 1, False)[0]
        return Conditions(*({"encoder_hidden_states": e} for e in (uncond_embeds, source_embeds, target_embeds)))
    target_embeds, uncond_embeds, target_pooled, uncond_pooled = pipe.encode_prompt(
        target, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    source_embeds, _, source_pooled, _ = pipe.encode_prompt(
        source, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    # SDXL micro-conditioning: original size, crop top-left, target size.
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=target_embeds.dtype, device=device)
    return Conditions(
        *(
            {"encoder_hidden_states": e, "added_cond_kwargs": {"text_embeds": p, "time_ids": time_ids}}
            for e, p in (
                (uncond_embeds, uncond_pooled),
                (source_embeds, source_pooled),
                (target_embeds, target_pooled),
            )
        )
    )


@contextmanager
def _vae_precision(pipe) -> Iterator[None]:
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
    vae, config = pipe.vae, pipe.vae.config
    pixels = pipe.image_processor.preprocess(image).to(pipe._execution_device)
    with _vae_precision(pipe):
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = (latents - mean) * config.scaling_factor / std
    else:
        latents = (latents - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor
    return latents.to(pipe.unet.dtype)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, output_type: str = "pil"):
    """Latents to images of ``output_type`` ("pil", "np", "pt"; "latent" returns them as they are)."""
    if output_type == "latent":
        return latents
    vae, config = pipe.vae, pipe.vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    with _vae_precision(pipe):
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type=output_type)


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
    **changes,
) -> EditOutput:
    """Edits ``image`` (described by ``source_prompt``) towards ``target_prompt`` with any SD 1.x/2.x or SDXL pipeline.

    ``config`` (default: the ``preset``) with ``changes`` applied, e.g. ``guidance_scale=5.0``. The pipeline's
    scheduler config (noise schedule, spacing, ``steps_offset``, prediction type) is used with DDIM, eta = 0; the
    pipeline and its models are left as they were."""
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
    image = prepare_image(image, size_multiple(pipe), height, width)
    scheduler = ddim_scheduler(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps, device=pipe._execution_device)
    conditions = encode_conditions(pipe, source, target, image.height, image.width)
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

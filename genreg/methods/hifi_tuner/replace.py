"""Personalized subject replacement (HiFi Tuner Sec. 3.4, Algorithm 3).

Encode the image I_r to x^r_0 and DDIM-invert it under its caption c_r (w = 1); optimize the null text phi_t of every
step (K steps each) so that guided sampling retraces the inversion, keeping the cross-attention maps a^{r*}_t of that
reconstruction; then sample from x^r_T with c_g (c_r with the object's word swapped for the subject's, w_g) and the
subject's vectors [c_g, c_s^t], phi_t*, where every token's cross-attention map is the reconstruction's except those
of [c_s^t, w_g], which are the generation's own. The object is found by its word's attention, so no mask is needed.

The reconstruction runs beside the generation in one UNet call per step (rows [phi, c_r, phi, [c_g, c_s^t]]), so its
maps are never stored. A map made of the stored columns and the fresh ones no longer sums to one (measured: 1.29 on
average, up to 1.76, and a black background turned white), so genreg scales each query's weights back to one
(``normalize_maps``; off, it follows the algorithm as written). The paper leaves K open (``Replacement`` names
genreg's: Null-text inversion's 10). The paper
captions I_r with BLIP-2, which cannot be downloaded here: the caller gives c_r and c_g.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import PIL.Image
import torch

from ...injection import CrossAttentionInjection, injecting
from ...inversion import ddim_invert, ddim_step, null_text_optimization, required_ddim
from ...sd import decode_latents, encode_image
from .subject import HiFiSubject


@dataclass
class Replacement:
    null_text_steps: int = 10  # K per sampling step (0: plain DDIM inversion, phi_t = phi)
    learning_rate: float = 1e-2  # Adam on phi_t, decayed over the steps as in Null-text inversion
    inject: bool = True  # cross-attention maps from the reconstruction (False: the generation's own everywhere)
    normalize_maps: bool = True  # each query's mixed map scaled to sum to one (False: as Algorithm 3 writes it)

    def __post_init__(self):
        if self.null_text_steps < 0:
            raise ValueError(f"null_text_steps must be >= 0, got {self.null_text_steps}")


def token_alignment(tokenizer, source: str, target: str, num_vectors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns, fresh) for ``CrossAttentionInjection``: the target prompt's tokens read their maps from the same
    tokens of the source prompt, shifted past the swapped words; the swapped words (the span where the two prompts'
    tokens differ) and the last ``num_vectors`` positions (the subject's vectors) keep their own."""
    length = tokenizer.model_max_length
    src, tgt = (tokenizer(p, truncation=True, max_length=length).input_ids for p in (source, target))
    prefix = next((i for i, (a, b) in enumerate(zip(src, tgt, strict=False)) if a != b), min(len(src), len(tgt)))
    suffix = 0
    while suffix < min(len(src), len(tgt)) - prefix and src[-1 - suffix] == tgt[-1 - suffix]:
        suffix += 1
    if prefix + suffix == len(tgt) == len(src):
        raise ValueError(
            f"the target prompt {target!r} has the same tokens as the source prompt: swap the object's word for the "
            "subject's word (e.g. 'a red circle' -> 'a red star')"
        )
    columns = (torch.arange(length) + len(src) - len(tgt)).clamp(0, length - 1)
    columns[:prefix] = torch.arange(prefix)
    fresh = torch.zeros(length, dtype=torch.bool)
    fresh[prefix : len(tgt) - suffix] = True
    fresh[length - num_vectors :] = True
    return columns, fresh


def replace_subject(
    pipe,
    subject: HiFiSubject,
    image: PIL.Image.Image,
    source_prompt: str,
    target_prompt: str,
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int | None = None,
    settings: Replacement | None = None,
    inverted: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[PIL.Image.Image, dict]:
    """``image`` (described by ``source_prompt``) with the object that ``target_prompt`` renames by the subject's
    word replaced by the subject (Algorithm 3). Returns the image and ``info``: the reconstruction drawn beside it,
    and ``"inverted"``, (x_T, [phi_t]) to pass back as ``inverted`` for another subject or target prompt of the same
    image, source prompt, steps and guidance scale (the inversion and null-text optimization are then skipped).
    ``on_step(done, total)`` is called after each inversion, null-text and sampling step (raising in it stops)."""
    settings = settings or Replacement()
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("HiFi Tuner subjects support pipelines with one text encoder (SD 1.x/2.x), not SDXL yet")
    unet, device = pipe.unet, pipe._execution_device
    scheduler = required_ddim(pipe.scheduler)
    steps, rows = subject.schedule(scheduler, num_inference_steps)
    scheduler.set_timesteps(steps, device=device)
    columns, fresh = token_alignment(pipe.tokenizer, source_prompt, target_prompt, subject.num_vectors)
    c_r = pipe.encode_prompt(source_prompt, device, 1, False)[0]
    conds = [subject.prompt_embeds(pipe, [target_prompt], r) for r in rows]
    phi = pipe.encode_prompt("", device, 1, False)[0]

    def model(x, t, embeds):
        return unet(x, t, embeds.to(unet.dtype)).sample

    phases = 1 if inverted is not None else 3 if settings.null_text_steps else 2
    done = [0]

    def tick(*_) -> None:
        done[0] += 1
        if on_step is not None:
            on_step(done[0], phases * steps)

    if inverted is None:
        with torch.no_grad():
            latents = encode_image(pipe, image.convert("RGB"))
            trajectory = ddim_invert(lambda z, t: model(z, t, c_r), latents, scheduler, callback=tick)
        phis = [phi] * steps
        if settings.null_text_steps:
            fit = settings.null_text_steps, settings.learning_rate
            phis = null_text_optimization(model, trajectory, scheduler, c_r, phi, guidance_scale, *fit, callback=tick)
        inverted = (trajectory[-1], phis)
    x_T, phis = inverted
    if len(phis) != steps:
        raise ValueError(f"the inversion passed has {len(phis)} steps, this call samples {steps}: invert again")
    injection = CrossAttentionInjection([1], [3], columns, fresh, normalize=settings.normalize_maps)
    x_source = x_target = x_T
    with torch.no_grad(), injecting(unet, injection) if settings.inject else nullcontext():
        for i, t in enumerate(scheduler.timesteps):
            uncond = phis[i].to(c_r)
            embeds = torch.cat([uncond, c_r, uncond, conds[i].to(c_r)])
            u_s, c_s, u_t, c_t = model(torch.cat([x_source, x_source, x_target, x_target]), t, embeds).chunk(4)
            x_source = ddim_step(scheduler, u_s + guidance_scale * (c_s - u_s), t, x_source)
            x_target = ddim_step(scheduler, u_t + guidance_scale * (c_t - u_t), t, x_target)
            tick()
        reconstruction, replaced = decode_latents(pipe, torch.cat([x_source, x_target]))
    return replaced, {"reconstruction": reconstruction, "inverted": inverted}

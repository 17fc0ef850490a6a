"""DDIM inversion (Song et al., 2021; Mokady et al., 2023 for its use in editing) over a denoiser callable.

A denoiser maps (latents, timestep) to the network's prediction in its own parameterisation (epsilon or v). The
inversion runs the deterministic DDIM sampler (eta = 0) backwards: each step is the exact algebraic inverse of
``DDIMScheduler.step`` with the network's noise estimate taken at the known, less noisy latent (the usual
approximation eps(z_t, t) ~ eps(z_prev, t)). Timesteps and the alpha pair of every step are read from the scheduler
itself, so leading / trailing / linspace spacing, ``steps_offset``, ``set_alpha_to_one`` and the prediction type all
match what sampling with that scheduler does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

from .sd import to_space

logger = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_scheduler(scheduler_or_config) -> DDIMScheduler:
    """A DDIM scheduler with the noise schedule, timestep spacing, ``steps_offset`` and prediction type of any
    diffusers scheduler (or its config); sample clipping and thresholding are off, as an inversion cannot undo them."""
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    return DDIMScheduler.from_config(config, clip_sample=False, thresholding=False)


def required_ddim(scheduler) -> DDIMScheduler:
    """``ddim_scheduler`` for a method that must sample with DDIM: a scheduler of another kind is converted with a
    warning (the pipeline keeps its own), one without a DDPM noise schedule (flow matching, EDM) is refused."""
    config = scheduler.config
    if "beta_schedule" not in config or "num_train_timesteps" not in config:
        raise ValueError(
            f"{type(scheduler).__name__} has no DDPM noise schedule, so DDIM inversion cannot run on it; this method "
            "supports SD 1.x/2.x and SDXL models (DDIM, PNDM, Euler, DPM-Solver and other DDPM-schedule schedulers)"
        )
    if not isinstance(scheduler, DDIMScheduler):
        logger.warning(
            "this method inverts and samples with DDIM (eta 0): the pipeline's %s is converted to DDIM with the same "
            "noise schedule and prediction type for this call; the pipeline keeps its own scheduler",
            type(scheduler).__name__,
        )
    return ddim_scheduler(scheduler)


def step_alphas(scheduler: DDIMScheduler, timestep: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar_t, alpha_bar_prev) of the sampling step at ``timestep``, paired exactly as ``DDIMScheduler.step``
    pairs them (its previous timestep is t - T // steps, also under trailing or linspace spacing)."""
    t = int(timestep)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return scheduler.alphas_cumprod[t], alpha_prev


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    latents: torch.Tensor,
    scheduler: DDIMScheduler,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """Inverts clean ``latents`` along ``scheduler.timesteps`` (``set_timesteps`` must have been called).

    Returns the trajectory [z_0, z_1, ..., z_N]: z_0 is ``latents``, and z_k is the latent at the input of sampling
    step N - k, so sampling starts from z_N and its step i (timestep ``scheduler.timesteps[i]``) meets z_{N-i}.
    ``callback(k, z_k)`` is called after each step.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before inverting")
    prediction_type = scheduler.config.prediction_type
    trajectory = [latents]
    z = latents
    for k, t in enumerate(reversed(scheduler.timesteps), start=1):
        alpha_t, alpha_prev = step_alphas(scheduler, t)
        # The network is told t, so its epsilon estimate reads z as a latent at alpha_t; z itself sits at alpha_prev.
        eps = to_space(denoiser(z, t), z, alpha_t, prediction_type, "epsilon").to(z.dtype)
        a_t, a_prev = alpha_t.to(z.device, torch.float32), alpha_prev.to(z.device, torch.float32)
        x0 = (z.float() - (1 - a_prev).sqrt() * eps.float()) / a_prev.sqrt()
        z = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps.float()).to(latents.dtype)
        trajectory.append(z)
        if callback is not None:
            callback(k, z)
    return trajectory


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, latents: torch.Tensor, scheduler: DDIMScheduler) -> torch.Tensor:
    """Plain DDIM sampling (eta = 0) from ``latents`` along ``scheduler.timesteps``; the inverse of ``ddim_invert``."""
    for t in scheduler.timesteps:
        latents = scheduler.step(denoiser(latents, t), t, latents, eta=0.0).prev_sample
    return latents

"""DDIM inversion (Song et al., 2021; Mokady et al., 2023 for its use in editing) over a denoiser callable, and
null-text optimization (Mokady et al., 2023) that makes guided sampling retrace an inversion.

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


def ddim_step(scheduler: DDIMScheduler, pred: torch.Tensor, timestep, x: torch.Tensor) -> torch.Tensor:
    """x_{t-1} of DDIM (eta 0) from the network's (guided) prediction at x_t, as ``scheduler.step`` computes it but
    differentiable in ``pred`` and without touching the scheduler's state."""
    alpha, alpha_prev = step_alphas(scheduler, timestep)
    kind = scheduler.config.prediction_type
    eps, x0 = to_space(pred, x, alpha, kind, "epsilon"), to_space(pred, x, alpha, kind, "x0")
    return alpha_prev.to(x).sqrt() * x0 + (1 - alpha_prev).to(x).sqrt() * eps


def fit_null_text(
    step: Callable[[torch.Tensor], torch.Tensor],
    phi: torch.Tensor,
    goal: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    steps: int,
    mask: torch.Tensor | None = None,
    tolerance: float = 0.0,
) -> float:
    """Null-text inversion's inner loop: ``steps`` optimizer steps on ``phi`` (a leaf the optimizer holds) for
    mean ||goal - step(phi)||^2, over the latent positions where ``mask`` (H, W) is True if given; stops early once the
    loss is below ``tolerance``. Returns the last loss."""
    loss = torch.zeros(())
    for _ in range(steps):
        error = step(phi) - goal
        loss = (error if mask is None else error[..., mask]).float().pow(2).mean()
        if loss.item() < tolerance:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def null_text_optimization(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    trajectory: list[torch.Tensor],
    scheduler: DDIMScheduler,
    cond: torch.Tensor,
    phi: torch.Tensor,
    guidance_scale: float,
    steps: int = 10,
    learning_rate: float = 1e-2,
    tolerance: float = 1e-5,
    callback: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """phi_t for every sampling step such that guided DDIM from the inversion's z_N under ``cond`` retraces
    ``trajectory`` (Mokady et al., Eq. 6: min ||z*_{t-1} - z_{t-1}(z_t, phi_t, C)||^2, phi_t starting from phi_{t+1}).

    ``denoiser(latents, t, embeds)`` is the network's prediction. Follows the authors' code: Adam at
    ``learning_rate`` x (1 - i / 2N) at step i of N, stopping early below ``tolerance`` + 2e-5 i. ``callback(i)`` is
    called after each step's fit."""
    n = len(scheduler.timesteps)
    x, phis = trajectory[-1], []
    phi = phi.detach().clone().float()
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            cond_pred = denoiser(x, t, cond)

        def step(p, x=x, t=t, cond_pred=cond_pred):
            uncond = denoiser(x, t, p.to(cond.dtype))
            return ddim_step(scheduler, uncond + guidance_scale * (cond_pred - uncond), t, x)

        phi.requires_grad_(True)
        optimizer = torch.optim.Adam([phi], lr=learning_rate * (1 - i / (2 * n)))
        fit_null_text(step, phi, trajectory[n - i - 1], optimizer, steps, tolerance=tolerance + 2e-5 * i)
        phi = phi.detach()
        phis.append(phi.clone())
        with torch.no_grad():
            x = step(phi)
        if callback is not None:
            callback(i)
    return phis

"""Small pieces of the diffusion training objective that every trainer shares."""

from __future__ import annotations

import torch


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (the posterior mean; deterministic, so resumed runs match exactly)."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def noise_and_timesteps(seeds: torch.Tensor, shape: tuple[int, ...], num_train_timesteps: int, device, dtype):
    """Per-sample noise and timestep, each drawn from the sample's own seed (so batching never changes them)."""
    noise, steps = [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(int(seed))
        steps.append(int(torch.randint(0, num_train_timesteps, (1,), generator=g)))
        noise.append(torch.randn(shape, generator=g))
    return torch.stack(noise).to(device, dtype), torch.tensor(steps, device=device)


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network is trained to predict at ``t``: epsilon, or v = sqrt(a) eps - sqrt(1 - a) x0."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"prediction_type {kind!r} is not supported for training; use 'epsilon' or 'v_prediction'")

"""Small pieces of the diffusion training objective that every trainer shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sd import diffusion_target, scale_latents


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (the posterior mean; deterministic, so resumed runs match exactly)."""
    return scale_latents(vae, vae.encode(pixels.to(vae.dtype)).latent_dist.mode())


def noise_and_timesteps(seeds: torch.Tensor, shape: tuple[int, ...], num_train_timesteps: int, device, dtype):
    """Per-sample noise and timestep, each drawn from the sample's own seed (so batching never changes them)."""
    noise, steps = [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(int(seed))
        steps.append(int(torch.randint(0, num_train_timesteps, (1,), generator=g)))
        noise.append(torch.randn(shape, generator=g))
    return torch.stack(noise).to(device, dtype), torch.tensor(steps, device=device)


def noised_batch(
    unet, vae, scheduler, batch: dict, timesteps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_t, t, target) of ``batch["pixel_values"]``, each sample noised from its own ``batch["seed"]``, at the
    seed's timestep or at ``timesteps`` when given."""
    with torch.no_grad():
        x0 = encode_latents(vae, batch["pixel_values"]).to(unet.dtype)
    noise, t = noise_and_timesteps(
        batch["seed"], x0.shape[1:], scheduler.config.num_train_timesteps, x0.device, x0.dtype
    )
    t = t if timesteps is None else timesteps.to(t)
    return scheduler.add_noise(x0, noise, t), t, diffusion_target(scheduler, x0, noise, t)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """||M (pred - target)||^2 averaged over each sample's masked latent entries (M: the image mask area-resized to
    the latent grid), then over the batch; the plain mean without a mask."""
    err = (pred.float() - target.float()).pow(2)
    if mask is None:
        return err.mean()
    weight = F.interpolate(mask.float(), size=err.shape[-2:], mode="area")
    per_sample = (weight * err).sum((1, 2, 3)) / (weight.sum((1, 2, 3)) * err.shape[1]).clamp_min(1e-8)
    return per_sample.mean()


def diffusion_loss(unet, vae, scheduler, batch: dict, cond: torch.Tensor, mask: torch.Tensor | None = None):
    """||target - net(z_t, t, c)||^2 over ``batch["pixel_values"]``, each sample noised from ``batch["seed"]``;
    weighted by the images' ``mask`` (B, 1, H, W) when given (``masked_mse``)."""
    z_t, t, target = noised_batch(unet, vae, scheduler, batch)
    pred = unet(z_t, t, cond.to(unet.dtype)).sample
    if mask is not None:
        return masked_mse(pred, target, mask)
    return F.mse_loss(pred.float(), target.float())


class FineTuneObjective(torch.nn.Module):
    """The diffusion loss of ``pipe.unet`` (whatever in it is trainable) under the frozen text encoder's captions;
    with ``masked``, weighted by each image's ``batch["mask"]``."""

    def __init__(self, pipe, masked: bool = False):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.scheduler = pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler
        self.masked = masked
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False)

    def forward(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            cond = self.text_encoder(batch["input_ids"])[0]
        mask = batch["mask"] if self.masked else None
        return diffusion_loss(self.unet, self.vae, self.scheduler, batch, cond, mask)

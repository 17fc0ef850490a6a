"""Memorization and quality metrics, usable on their own and by MemControl's search.

- ``text_noise_norm``: Wen et al. (ICLR 2024)'s detector, ||eps(x_t, c) - eps(x_t, empty)||_2 averaged over the
  first sampling steps: memorized prompts pull the prediction far from the unconditional one from the first step.
  ``teacher_forced_noise_norm``: the same norm at a noised training image (MemControl's reward).
- ``nearest_training``: each generation's most similar training image, by pixels (1 - mean absolute difference in
  [0, 1]) or by an image embedding (cosine).
- ``extraction_rate``: the share of generations whose nearest training image is closer than a threshold.
- ``frechet_distance``: the Frechet distance between two sets of embeddings (FID's formula over any embedding).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from .diffusion import encode_latents, noise_and_timesteps
from .sd import predict, text_conditions, to_space


def _pixels(images) -> torch.Tensor:
    """PIL images or an (N, H, W, C) array in [0, 1] / uint8 as an (N, H*W*C) float tensor in [0, 1]."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    array = np.asarray(images)
    array = array.astype(np.float32) / 255 if array.dtype == np.uint8 else array.astype(np.float32)
    return torch.from_numpy(array).flatten(1)


@torch.no_grad()
def text_noise_norm(
    pipe, prompts: list[str], steps: int = 1, num_inference_steps: int = 50, seed: int = 0, guidance_scale: float = 7.5
) -> torch.Tensor:
    """Per prompt, the mean over the first ``steps`` sampling steps (CFG sampling, as generation runs) of
    ||eps(x_t, c) - eps(x_t, empty)||_2 over the latent (in epsilon, whatever the model predicts); one seed per prompt
    (``seed + i``)."""
    if steps < 1 or steps > num_inference_steps:
        raise ValueError(f"steps must be in [1, num_inference_steps], got {steps}")
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    device, unet = pipe._execution_device, pipe.unet
    side = unet.config.sample_size
    norms = []
    for i, prompt in enumerate(prompts):
        scheduler.set_timesteps(num_inference_steps, device=device)
        g = torch.Generator().manual_seed(seed + i)
        latents = torch.randn(1, unet.config.in_channels, side, side, generator=g).to(device, unet.dtype)
        latents = latents * scheduler.init_noise_sigma
        height = width = side * pipe.vae_scale_factor
        rows = text_conditions(pipe, [prompt], height, width)
        total = 0.0
        for t in scheduler.timesteps[:steps]:
            x = scheduler.scale_model_input(latents, t)
            uncond, cond = predict(unet, x, t, rows).float().chunk(2)
            a = scheduler.alphas_cumprod[int(t)]
            eps_u, eps_c = (
                to_space(p, x.float(), a, scheduler.config.prediction_type, "epsilon") for p in (uncond, cond)
            )
            total += float((eps_c - eps_u).flatten().norm())
            latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample.to(unet.dtype)
        norms.append(total / steps)
    return torch.tensor(norms)


@torch.no_grad()
def teacher_forced_noise_norm(pipe, pixel_values: torch.Tensor, input_ids: torch.Tensor, seeds: torch.Tensor):
    """Per training image (pixels in [-1, 1], its caption's token ids), ||eps(x_t, t, c) - eps(x_t, t, empty)||_2 at
    x_t = its latent noised at one timestep drawn from ``seeds`` (one per image); in epsilon whatever the model
    predicts."""
    unet, scheduler = pipe.unet, pipe.scheduler
    x0 = encode_latents(pipe.vae, pixel_values.to(pipe.device)).to(unet.dtype)
    steps = scheduler.config.num_train_timesteps
    noise, t = noise_and_timesteps(seeds, x0.shape[1:], steps, x0.device, x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)
    empty = pipe.tokenizer([""] * len(x0), padding="max_length", max_length=input_ids.shape[1], return_tensors="pt")
    cond = pipe.text_encoder(torch.cat([empty.input_ids, input_ids.cpu()]).to(pipe.device))[0].to(unet.dtype)
    uncond, cond = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), cond).sample.float().chunk(2)
    alpha_bar = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
    eps_u, eps_c = (
        to_space(p, x_t.float(), alpha_bar, scheduler.config.prediction_type, "epsilon") for p in (uncond, cond)
    )
    return (eps_c - eps_u).flatten(1).norm(dim=1).cpu()


def nearest_training(generated, training, embed: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest training image, its similarity) for each generation: by pixels, 1 - mean |a - b| in
    [0, 1] (same sizes), or with ``embed(images) -> (N, d)`` by cosine similarity."""
    if embed is not None:
        a = torch.nn.functional.normalize(torch.as_tensor(embed(generated)).float(), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(embed(training)).float(), dim=-1)
        similarity = a @ b.T
    else:
        a, b = _pixels(generated), _pixels(training)
        if a.shape[1] != b.shape[1]:
            raise ValueError("pixel similarity needs generated and training images of the same size")
        similarity = 1 - torch.cdist(a, b, p=1) / a.shape[1]
    best, index = similarity.max(dim=1)
    return index, best


def extraction_rate(similarity: torch.Tensor, threshold: float) -> float:
    """The share of generations whose nearest-training similarity exceeds ``threshold``."""
    return float((torch.as_tensor(similarity) > threshold).float().mean())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) over two sets of embeddings (N, d) (float64)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least two embeddings per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()  # tr((S_a S_b)^(1/2))
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)

"""Reference-guided generation (HiFi Tuner Sec. 3.3, Algorithm 2; the mask alignment of Appendix B, Algorithm 4).

Draw I_g1 with the subject (Eq. 7); find its subject mask M_g (``segment``); pick the training image closest to it
(``embed``, cosine); align that reference's mask M_r to M_g by a similarity transform (scale, rotation, translation)
that minimises the Chamfer distance of the two masks' pixels (Algorithm 4's one-sided sum_p min_q ||T(p) - q||^2
collapses the reference to a point; the other side, as in Eq. 9's mask difference, prevents it); DDIM-invert the
transformed reference under its caption (w = 1); then sample again from the same x_T: at t_s paste the inverted
latent inside the aligned mask and start phi_h = phi; for t_e <= t <= t_s take J Adam steps on phi_h for
||x*_{t-1}[M] - F^(t)(x_t, [c, c_s^t], phi_h)[M]||^2 (Eq. 10) and write that F's masked part into x_{t-1}.

The paper segments with Grounding SAM, picks with DINO and captions the reference with BLIP-2; none can be
downloaded here, so the caller brings ``segment`` and ``embed`` and each reference's mask and caption (the subject
kit's). The paper leaves Algorithm 4's iterations and learning rate open: ``ReferenceGuidance`` names genreg's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ...inversion import ddim_invert, ddim_step, fit_null_text, required_ddim
from ...sd import decode_latents, encode_image
from .subject import HiFiSubject


@dataclass
class ReferenceGuidance:
    start: float = 0.8  # t_s / T (the paper: 40 of 50 DDIM steps)
    end: float = 0.2  # t_e / T (10 of 50)
    inner_steps: int = 10  # J
    learning_rate: float = 1e-2  # Adam on phi_h
    align_steps: int = 200  # Algorithm 4's L (unspecified in the paper)
    align_learning_rate: float = 0.05
    # The latent pixels guided: those whose share of the moved subject mask exceeds this (the paper resizes M_r* to
    # the latent grid without saying how it is binarized).
    mask_coverage: float = 0.5
    fill: str = "background"  # what the moved reference shows where the move uncovers it: "background" or "zeros"

    def __post_init__(self):
        if not 0 <= self.end <= self.start <= 1:
            raise ValueError(f"the guided window needs 0 <= end <= start <= 1, got start {self.start}, end {self.end}")
        if self.fill not in ("background", "zeros"):
            raise ValueError(f"fill is 'background' (the reference's) or 'zeros' (black), got {self.fill!r}")
        if not 0 <= self.mask_coverage < 1:
            raise ValueError(f"mask_coverage is a share in [0, 1), got {self.mask_coverage}")
        if self.inner_steps < 0 or self.align_steps < 0:
            raise ValueError("inner_steps and align_steps must be >= 0")


@dataclass
class Reference:
    image: PIL.Image.Image
    mask: np.ndarray  # (H, W) bool, the subject
    caption: str  # c_r: what the image shows, in words (the subject by its word)


def _points(mask: torch.Tensor) -> torch.Tensor:
    """The mask's pixel centres as (x, y) in [-1, 1] (``affine_grid``'s coordinates, corners aligned off)."""
    h, w = mask.shape
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([(2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1], dim=1).float()


def _matrix(theta: torch.Tensor) -> torch.Tensor:
    """T_theta = translation o rotation o uniform scale, as a 2x3 matrix; theta = (log scale, angle, tx, ty)."""
    s, a = theta[0].exp(), theta[1]
    rotation = torch.stack([torch.stack([a.cos(), -a.sin()]), torch.stack([a.sin(), a.cos()])])
    return torch.cat([s * rotation, theta[2:, None]], dim=1)


def align_masks(source: np.ndarray, target: np.ndarray, steps: int = 200, lr: float = 0.05) -> torch.Tensor:
    """The 2x3 similarity transform T that brings mask ``source`` onto ``target``: the Chamfer distance of the
    point sets, mean_p min_q ||T(p) - q||^2 + mean_q min_p ||T(p) - q||^2, by Adam from the centroids' offset and
    the areas' scale. Algorithm 4 writes only the first term, whose minimum shrinks the reference to a point inside
    the target (on an L-shaped mask its IoU with the target fell from 0.66 at the start to 0.03 after 1,000 steps);
    the second term, Eq. 9's other side of ||T(M_r) - M_g||, keeps the whole target covered."""
    p, q = _points(torch.from_numpy(source)), _points(torch.from_numpy(target))
    if not len(p) or not len(q):
        raise ValueError("cannot align an empty mask: the reference or the generation shows no subject")
    scale = 0.5 * math.log(len(q) / len(p))
    shift = q.mean(0) - math.exp(scale) * p.mean(0)
    theta = torch.tensor([scale, 0.0, *shift.tolist()], requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        moved = p @ _matrix(theta)[:, :2].T + _matrix(theta)[:, 2]
        squared = torch.cdist(moved, q).pow(2)
        loss = squared.min(dim=1).values.mean() + squared.min(dim=0).values.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return _matrix(theta.detach())


def warp(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``image`` (C, H, W) moved by ``matrix``: out(x) = image(T^{-1}(x)), outside filled with zeros."""
    full = torch.cat([matrix, torch.tensor([[0.0, 0.0, 1.0]])])
    inverse = torch.linalg.inv(full)[:2]
    grid = F.affine_grid(inverse[None], [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None].float(), grid, align_corners=False)[0]


def closest_reference(embed: Callable, generated: PIL.Image.Image, references: list[Reference]) -> int:
    features = F.normalize(embed([generated] + [r.image for r in references]).float(), dim=-1)
    return int((features[1:] @ features[0]).argmax())


def aligned_reference(
    reference: Reference, target: np.ndarray, settings: ReferenceGuidance
) -> tuple[PIL.Image.Image, np.ndarray]:
    """The reference image and its subject mask (as weights in [0, 1], soft at the edge) moved onto mask ``target``
    (Algorithm 4's transform). What the move uncovers shows the reference's background colour (the median outside
    its mask) with ``settings.fill="background"``, so that the image stays one the VAE and the UNet know: a black
    fill beside the subject changes the subject's latents (on the bundled VAE a black band on a white ground decodes
    green and tints what it touches)."""
    source = np.asarray(reference.mask, bool)
    matrix = align_masks(source, target, settings.align_steps, settings.align_learning_rate)
    pixels = torch.from_numpy(np.asarray(reference.image.convert("RGB"), np.float32) / 255).permute(2, 0, 1)
    moved = warp(pixels, matrix)
    if settings.fill == "background" and (~source).any():
        covered = warp(torch.ones_like(pixels[:1]), matrix)
        background = pixels[:, torch.from_numpy(~source)].median(dim=1).values[:, None, None]
        moved = moved + (1 - covered) * background
    moved = moved.permute(1, 2, 0).numpy()
    mask = warp(torch.from_numpy(np.asarray(reference.mask, np.float32))[None], matrix)[0].numpy()
    return PIL.Image.fromarray((moved * 255).clip(0, 255).astype(np.uint8)), mask


def reference_guided(
    pipe,
    subject: HiFiSubject,
    prompt: str,
    references: list[Reference],
    segment: Callable[[PIL.Image.Image], np.ndarray],
    embed: Callable[[list[PIL.Image.Image]], torch.Tensor],
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int | None = None,
    generator: torch.Generator | None = None,
    settings: ReferenceGuidance | None = None,
) -> tuple[PIL.Image.Image, dict]:
    """One image of ``prompt`` with the subject, guided by its closest reference (Algorithm 2). Returns the image and
    what the guidance did: the first draw, the reference picked, the aligned mask, and per guided step the squared
    distance of the written masked latents to the inverted reference's, relative to the latter's squared norm (or
    why it did not guide)."""
    settings = settings or ReferenceGuidance()
    if not references:
        raise ValueError("reference-guided generation needs the subject's training images with their masks")
    unet, device = pipe.unet, pipe._execution_device
    scheduler = required_ddim(pipe.scheduler)
    steps, rows = subject.schedule(scheduler, num_inference_steps)
    scheduler.set_timesteps(steps, device=device)
    conds = [subject.prompt_embeds(pipe, [prompt], r) for r in rows]
    phi = pipe.encode_prompt("", device, 1, False)[0]
    size = unet.config.sample_size
    shape = (1, unet.config.in_channels, size, size)
    x_T = torch.randn(shape, generator=generator).to(device, unet.dtype) * scheduler.init_noise_sigma

    def model(x, t, cond):
        return unet(x, t, cond.to(unet.dtype)).sample

    def guided(x, t, uncond, cond_pred):
        u = model(x, t, uncond)
        return ddim_step(scheduler, u + guidance_scale * (cond_pred - u), t, x)

    with torch.no_grad():
        x = x_T
        for i, t in enumerate(scheduler.timesteps):
            x = guided(x, t, phi, model(x, t, conds[i]))
        first = decode_latents(pipe, x)[0]
    info = {"first": first}
    target = np.asarray(segment(first), bool)
    if not target.any():
        return first, info | {"skipped": "no subject found in the first draw"}
    pick = closest_reference(embed, first, references)
    reference = references[pick]
    moved, aligned = aligned_reference(reference, target, settings)
    mask = F.interpolate(torch.from_numpy(aligned)[None, None], size=(size, size), mode="area")[0, 0]
    mask = mask > settings.mask_coverage
    info |= {"reference": pick, "aligned_mask": aligned > 0.5}
    if not mask.any():
        return first, info | {"skipped": "the aligned mask covers no latent pixel"}
    mask = mask.to(device)
    c_r = pipe.encode_prompt(reference.caption, device, 1, False)[0]
    with torch.no_grad():
        trajectory = ddim_invert(lambda z, t: model(z, t, c_r), encode_image(pipe, moved), scheduler)
    first_guided = round((1 - settings.start) * steps)
    last_guided = round((1 - settings.end) * steps)
    x = x_T
    phi_h = optimizer = None
    info["window_error"] = []
    for i, t in enumerate(scheduler.timesteps):
        if i == first_guided:
            x = torch.where(mask, trajectory[steps - i], x)
            phi_h = phi.detach().clone().float().requires_grad_(True)
            optimizer = torch.optim.Adam([phi_h], lr=settings.learning_rate)
        with torch.no_grad():
            cond_pred = model(x, t, conds[i])
            x_prev = guided(x, t, phi, cond_pred)
        if first_guided <= i <= last_guided and phi_h is not None:
            step = partial(guided, x, t, cond_pred=cond_pred)
            goal = trajectory[steps - i - 1]
            fit_null_text(step, phi_h, goal, optimizer, settings.inner_steps, mask)
            with torch.no_grad():
                x_prev = torch.where(mask, guided(x, t, phi_h, cond_pred), x_prev)
            error = (x_prev - goal)[..., mask].float().pow(2).sum() / goal[..., mask].float().pow(2).sum()
            info["window_error"].append(error.item())
        x = x_prev
    return decode_latents(pipe, x)[0], info

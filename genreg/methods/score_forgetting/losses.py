"""The math of Score Forgetting Distillation (Chen, Zhang, Zhou, ICLR 2025) on SiD (Zhou et al., ICML 2024).

Generator: x_g = G(z, c) = f_theta(sqrt(1 - a_init) z, t_init, c), the x0-prediction from pure noise at sigma_init.
Fake score: L_psi = E ||eps_psi(sqrt(a_t) x_g + sqrt(1 - a_t) eps, t, c) - eps||^2 on detached generator samples.
Generator: L_SiD = sum (f_phi - f_psi) (.) ((f_phi - x_g) - alpha (f_phi - f_psi)) / omega at x_t of the same x_g,
omega = mean |f_phi - x_g| (stop-gradient); the forget branch conditions G and f_psi on c_f, the teacher f_phi on the
override c_o. f(.) are x0-predictions under CFG (the teacher's and the fake's own scales), read from the network's
prediction type; the epsilon loss of the fake equals SD's SNR/(SNR+1)-weighted v loss.
"""

from __future__ import annotations

import torch

from ...sd import to_space


def timestep_of_sigma(scheduler, sigma: float) -> int:
    """The training timestep whose sigma = sqrt((1 - a) / a) is closest to ``sigma`` (the schedule-free way of
    stating SiD's t_min, t_init, t_max: 0.137, 2.5, 13.08 are 38/440/712 in DDPM's schedule, 20/625/980 in SD's)."""
    a = scheduler.alphas_cumprod.double()
    return int((((1 - a) / a).sqrt() - sigma).abs().argmin())


def x0_prediction(unet, x_t, t, conds: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, scale: float, scheduler):
    """f(x_t, t, c): the x0-prediction under CFG of ``scale`` (``conds`` = (uncond, cond) embeddings; one tensor:
    no guidance), gradient flowing to ``x_t``."""
    alpha_bar = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
    kind = scheduler.config.prediction_type
    if isinstance(conds, torch.Tensor) or scale == 1:
        cond = conds if isinstance(conds, torch.Tensor) else conds[1]
        pred = unet(x_t, t, cond).sample
    else:
        uncond, cond = conds
        pred_u, pred_c = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])).sample.chunk(2)
        pred = pred_u + scale * (pred_c - pred_u)
    return to_space(pred.float(), x_t.float(), alpha_bar, kind, "x0")


def generate(generator, z, cond, t_init: int, scheduler) -> torch.Tensor:
    """x_g = G(z, c): one step from sqrt(1 - a_init) z (the clean part zero) to the x0-prediction."""
    t = torch.full((len(z),), t_init, device=z.device, dtype=torch.long)
    x_init = (1 - scheduler.alphas_cumprod.to(z.device)[t_init]).sqrt() * z
    return x0_prediction(generator, x_init.to(z.dtype), t, cond, 1.0, scheduler)


def noised(x0, noise, t, scheduler) -> torch.Tensor:
    a = scheduler.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def fake_score_loss(fake, x_g, noise, t, cond, scheduler) -> torch.Tensor:
    """Denoising score matching of the fake network on generator samples, in epsilon: per-sample sum, batch mean."""
    x_t = noised(x_g.detach(), noise, t, scheduler)
    alpha_bar = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
    eps = to_space(
        fake(x_t, t, cond).sample.float(), x_t.float(), alpha_bar, scheduler.config.prediction_type, "epsilon"
    )
    return (eps - noise.float()).square().flatten(1).sum(1).mean()


def sid_generator_loss(real_x0, fake_x0, x_g, alpha: float) -> torch.Tensor:
    """L_SiD per sample, summed over elements and averaged over the batch, with omega under stop-gradient."""
    omega = (real_x0 - x_g).abs().flatten(1).mean(1).clamp_min(1e-5).detach().view(-1, 1, 1, 1)
    gap = real_x0 - fake_x0
    return (gap * ((real_x0 - x_g) - alpha * gap) / omega).flatten(1).sum(1).mean()

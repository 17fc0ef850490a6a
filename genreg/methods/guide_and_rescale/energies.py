"""Guide-and-Rescale's math (Titov et al., ECCV 2024): the self-guidance energies and the noise rescaling."""

from __future__ import annotations

import torch

from ...attention import AttentionRecord, attention_map_energy


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

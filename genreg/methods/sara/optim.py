"""SaRA's update (Hu et al., ICLR 2025): AdamW on the selected entries only (Eq. 3), the nuclear-norm loss
||P (.) M||_* on one random eligible matrix per step (Eqs. 4-5), and progressive re-selection M' = M and |P| < theta
(section 4.3) with the optimizer's moments reset.

Unlike the official code, the low-rank loss reaches the trained values (there it is computed on detached copies and
is inert), the first forward uses the weights' signs (not ``abs``), clipping acts on the trained values, and the
re-selection step still updates. Which entries of each value vector are still trained is the optimizer's state
(``active``), so it is checkpointed and resumed with the moments, which exist for those entries only.
"""

from __future__ import annotations

import random

import torch

from .sparse import SparseValues


class SaRAAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay over the ``active`` entries of each 1-D value vector; moments only there."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            active = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
            state.update(active=active, **_fresh_moments(p, int(p.numel())))
        return state

    def active(self, p: torch.Tensor) -> torch.Tensor:
        """The boolean mask of ``p``'s entries still trained."""
        return self._state(p)["active"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            (beta1, beta2), lr, eps, decay = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                active = state["active"]
                grad, value = p.grad[active].float(), p[active]
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
                value = value * (1 - lr * decay) - lr / (1 - beta1**t) * state["exp_avg"] / denom
                p[active] = value.to(p.dtype)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # the base class casts every state tensor to the parameter's dtype
            state["active"] = state["active"].bool()

    @torch.no_grad()
    def reselect(self, threshold: float) -> None:
        """M' = M and |P| < theta for every vector; the moments start again (as the official code does)."""
        for group in self.param_groups:
            for p in group["params"]:
                active = self.active(p) & (p.abs() < threshold)
                self.state[p] = {"active": active, **_fresh_moments(p, int(active.sum()))}


def _fresh_moments(p: torch.Tensor, n: int) -> dict:
    zeros = torch.zeros(n, dtype=torch.float32, device=p.device)
    return {"step": torch.zeros((), dtype=torch.float32), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}


def mask_frozen_gradients(optimizer: SaRAAdamW) -> None:
    """Zeroes the gradient of entries no longer trained, so clipping and logging see only the trained ones."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad[~optimizer.active(p)] = 0


def eligible_for_rank_loss(layers: dict[str, SparseValues], min_dim: int, min_selected: int = 100) -> list[str]:
    """Matrices the nuclear-norm loss may pick: 2-D, both sides above ``min_dim``, more than ``min_selected`` entries
    selected (the official code's rule; convolution kernels are never regularised)."""
    out = []
    for name, layer in layers.items():
        shape = layer.shape
        if len(shape) == 2 and min(shape) > min_dim and layer.values.numel() > min_selected:
            out.append(name)
    return out


def rank_loss(layer: SparseValues, active: torch.Tensor) -> torch.Tensor:
    """||P (.) M||_*: the sum of singular values of the matrix holding the trained values at their entries, zero
    elsewhere; its gradient reaches ``layer.values``."""
    dense = torch.zeros(layer.shape.numel(), dtype=torch.float32, device=layer.values.device)
    dense = dense.index_put((layer.index[active],), layer.values[active])
    return torch.linalg.svdvals(dense.view(layer.shape)).sum()


def pick_rank_layer(names: list[str], seed: int, step: int) -> str | None:
    """One eligible matrix, uniformly at random from (seed, step): the same on every process and on resume."""
    return random.Random(f"{seed}-{step}").choice(names) if names else None

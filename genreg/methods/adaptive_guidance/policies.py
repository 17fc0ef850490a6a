"""Adaptive Guidance and LinearAG (Castillo et al., 2023, arXiv 2312.12487) as guidance policies.

- ``AdaptiveGuidance``: CFG until gamma_t = cos(eps_c, eps_u) >= gamma_bar, conditional only afterwards.
- ``LinearAG``: on alternate steps of the first part the unconditional estimate is an affine combination of past
  estimates, u(t_i) ~ b0 c(t_i) + b1 c(t_{i-1}) + b2 u(t_{i-1}), with per-step least-squares coefficients.

AG has no official code. Where the paper is silent genreg follows its research notes: CFG is still applied on the
step where gamma_t crosses gamma_bar; the cosine is measured in x0 space by default (in epsilon space it starts near
1 at high noise, so a threshold there ends guidance at once); LinearAG regresses the current conditional and the
previous step's two predictions, with no intercept, on alternate steps of the first half.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...guidance import CFG, Guidance, Step, guidance_cosine
from ...io import atomic_write_text
from ...sd import SPACES


@dataclass
class AdaptiveGuidance:
    """AG: CFG while gamma_t < gamma_bar; the step where gamma_t first reaches gamma_bar still gets CFG, and from the
    next step that sample is conditional-only. Each sample switches on its own; the batch of the unconditional branch
    shrinks to the samples that still need it.

    Args:
        gamma_bar: cosine threshold; > 1 never switches (plain CFG).
        space: where the cosine is measured ("epsilon", "x0" or "v"); in epsilon space it starts near 1.
        min_cfg_steps: steps that always get CFG, whatever gamma_t says.
    """

    gamma_bar: float = 0.99
    space: str = "x0"
    min_cfg_steps: int = 1
    gammas: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.gamma_bar, bool) or not isinstance(self.gamma_bar, (int, float)):
            raise ValueError(f"gamma_bar must be a number, got {self.gamma_bar!r}")
        if not math.isfinite(self.gamma_bar):
            raise ValueError(f"gamma_bar must be finite, got {self.gamma_bar!r} (above 1 never switches: plain CFG)")
        if self.space not in SPACES:
            raise ValueError(f"unknown space {self.space!r}; choose one of {', '.join(SPACES)}")
        if isinstance(self.min_cfg_steps, bool) or not isinstance(self.min_cfg_steps, int) or self.min_cfg_steps < 0:
            raise ValueError(f"min_cfg_steps must be a whole number >= 0, got {self.min_cfg_steps!r}")

    def reset(self, batch_size: int, num_steps: int) -> None:
        self.switched = torch.zeros(batch_size, dtype=torch.bool)
        self.gammas = []

    def plan(self, step: Step) -> torch.Tensor:
        return ~self.switched if step.index >= self.min_cfg_steps else torch.ones_like(self.switched)

    def uncond(self, step: Step, cond, uncond, mask):
        gamma = torch.full((len(mask),), float("nan"))
        out = cond.clone()
        if mask.any():
            rows = mask.to(cond.device)
            out[rows] = uncond
            x_t = step.latents[rows]
            gamma[mask] = guidance_cosine(
                cond[rows], uncond, x_t, step.alpha_bar, step.prediction_type, self.space
            ).cpu()
            if step.index + 1 >= self.min_cfg_steps:
                self.switched |= gamma >= self.gamma_bar  # NaN (not evaluated) compares False
        self.gammas.append(gamma)
        return out


LINEAR_AG_FEATURES = ("cond", "prev_cond", "prev_uncond")


@dataclass
class LinearAGCoefficients:
    """Per-step least-squares coefficients of u(t_i) ~ b0 c(t_i) + b1 c(t_{i-1}) + b2 u(t_{i-1}), where c and u are
    the network's conditional and unconditional predictions, with the sampling settings they were fitted for."""

    coefficients: dict[int, list[float]]  # step index -> one coefficient per LINEAR_AG_FEATURES
    settings: dict  # scheduler class, timesteps, prediction type, guidance scale, linear_until

    def check(self, settings: dict) -> None:
        """Refuses to be used with other sampling settings than those fitted for."""

        def show(v):
            return f"{len(v)} steps {v[:2]}...{v[-1:]}" if isinstance(v, list) and len(v) > 3 else repr(v)

        for key, value in self.settings.items():
            if settings.get(key) != value:
                raise ValueError(
                    f"LinearAG coefficients were fitted for {key}={show(value)} but sampling uses "
                    f"{key}={show(settings.get(key))}; recalibrate for these settings with "
                    "scripts/calibrate_adaptive_guidance.py"
                )

    def save(self, path: str | os.PathLike) -> Path:
        data = {
            "features": LINEAR_AG_FEATURES,
            "settings": self.settings,
            "coefficients": {str(k): v for k, v in self.coefficients.items()},
        }
        return atomic_write_text(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearAGCoefficients:
        data = json.loads(Path(path).read_text())
        if tuple(data.get("features", ())) != LINEAR_AG_FEATURES:
            raise ValueError(
                f"{path} holds coefficients for features {data.get('features')}, not {LINEAR_AG_FEATURES}"
            )
        return cls({int(k): v for k, v in data["coefficients"].items()}, data["settings"])


def linear_ag_estimated_steps(num_steps: int, linear_until: float) -> list[int]:
    """Steps whose unconditional estimate is regressed: every second step of the first ``linear_until`` part."""
    return [i for i in range(1, num_steps) if i < linear_until * num_steps and i % 2 == 1]


def linear_ag_cfg_steps(num_steps: int, linear_until: float) -> list[int]:
    return [i for i in range(num_steps) if i < linear_until * num_steps and i % 2 == 0]


class LinearAGFitter:
    """Accumulates the normal equations of the per-step regressions from CFG trajectories (no trajectory is stored)."""

    def __init__(self, num_steps: int, linear_until: float):
        self.steps = linear_ag_estimated_steps(num_steps, linear_until)
        k = len(LINEAR_AG_FEATURES)
        self.xtx = {i: torch.zeros(k, k, dtype=torch.float64) for i in self.steps}
        self.xty = {i: torch.zeros(k, dtype=torch.float64) for i in self.steps}
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None

    def observe(self, index: int, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        """Record one CFG step's epsilon predictions (the same batch, in order, at every step)."""
        if index in self.xtx and self.prev is not None:
            x = torch.stack([cond.flatten(), self.prev[0].flatten(), self.prev[1].flatten()], dim=1).double()
            self.xtx[index] += (x.T @ x).cpu()
            self.xty[index] += (x.T @ uncond.flatten().double()).cpu()
        self.prev = (cond, uncond)

    def fit(self, settings: dict) -> LinearAGCoefficients:
        coefficients = {i: torch.linalg.solve(self.xtx[i], self.xty[i]).tolist() for i in self.steps}
        return LinearAGCoefficients(coefficients, settings)


@dataclass
class LinearAG:
    """LinearAG: in the first ``linear_until`` part of sampling, even steps run CFG and odd steps replace the
    unconditional pass by the fitted affine combination of past estimates; afterwards conditional only."""

    coefficients: LinearAGCoefficients
    linear_until: float = 0.5

    def reset(self, batch_size: int, num_steps: int) -> None:
        self.batch_size, self.num_steps = batch_size, num_steps
        self.cfg_steps = set(linear_ag_cfg_steps(num_steps, self.linear_until))
        self.estimated = set(linear_ag_estimated_steps(num_steps, self.linear_until))
        self.prev = None

    def check_sampling(self, scheduler, guidance_scale: float) -> None:
        self.coefficients.check(sampling_settings(scheduler, guidance_scale, self.linear_until))

    def plan(self, step: Step) -> torch.Tensor:
        return torch.full((self.batch_size,), step.index in self.cfg_steps, dtype=torch.bool)

    def uncond(self, step: Step, cond, uncond, mask):
        if step.index in self.cfg_steps:
            self.prev = (cond, uncond)
            return uncond
        if step.index in self.estimated:
            b = self.coefficients.coefficients[step.index]
            return b[0] * cond + b[1] * self.prev[0] + b[2] * self.prev[1]
        return cond


def make_guidance(
    kind: str,
    gamma_bar: float = 0.99,
    space: str = "x0",
    min_cfg_steps: int = 1,
    coefficients: LinearAGCoefficients | str | os.PathLike | None = None,
    linear_until: float = 0.5,
) -> Guidance:
    """Builds a policy by name: ``"cfg"``, ``"ag"`` or ``"linear_ag"`` (which needs fitted ``coefficients``)."""
    if kind == "cfg":
        return CFG()
    if kind == "ag":
        return AdaptiveGuidance(gamma_bar=gamma_bar, space=space, min_cfg_steps=min_cfg_steps)
    if kind == "linear_ag":
        if coefficients is None:
            raise ValueError(
                "guidance='linear_ag' needs linear_ag_coefficients: fit them with "
                "scripts/calibrate_adaptive_guidance.py"
            )
        if not isinstance(coefficients, LinearAGCoefficients):
            coefficients = LinearAGCoefficients.load(coefficients)
        return LinearAG(coefficients, linear_until=linear_until)
    raise ValueError(f"unknown guidance {kind!r}; choose 'cfg', 'ag' or 'linear_ag', or pass a policy object")


def sampling_settings(scheduler, guidance_scale: float, linear_until: float) -> dict:
    """The settings LinearAG coefficients are valid for (read after ``scheduler.set_timesteps``)."""
    return {
        "scheduler": type(scheduler).__name__,
        "timesteps": [int(t) for t in scheduler.timesteps],
        "prediction_type": scheduler.config.get("prediction_type", "epsilon"),
        "guidance_scale": float(guidance_scale),
        "linear_until": float(linear_until),
    }

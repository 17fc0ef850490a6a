"""Classifier-free guidance and its training-free speed-ups behind one small protocol.

A policy decides, step by step and sample by sample, whether the unconditional branch is evaluated (``plan``), and
what stands in for it (``uncond``): the pipeline's own CFG line ``u + s (c - u)`` then makes the guided prediction,
so with ``u = c`` a step is conditional-only, exactly. ``guided(unet, policy, scheduler)`` installs the policy as a
diffusers model hook for the length of one pipeline call: the UNet then runs only on the rows the policy asks for,
so a skipped branch costs nothing, and every stock text-to-image pipeline (SD 1.x/2.x, SDXL) gains the policy.

- ``CFG``: Ho & Salimans (2022), eps = eps_u + s (eps_c - eps_u), both branches at every step.
- ``AdaptiveGuidance``: Castillo et al. (2023, arXiv 2312.12487): CFG until gamma_t = cos(eps_c, eps_u) >= gamma_bar,
  conditional only afterwards.
- ``LinearAG``: same paper: on alternate steps of the first part the unconditional estimate is an affine
  combination of past estimates, with per-step least-squares coefficients (``LinearAGFitter``, ``calibrate``).

AG has no official code. Where the paper is silent genreg follows its research notes: CFG is still applied on the
step where gamma_t crosses gamma_bar; the cosine is measured in x0 space by default (in epsilon space it starts near
1 at high noise, so a threshold there ends guidance at once); LinearAG regresses the current conditional and the
previous step's two predictions, with no intercept, on alternate steps of the first half.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

SPACES = ("epsilon", "x0", "v")


@dataclass
class Step:
    """What a policy may look at on one denoising step."""

    index: int
    num_steps: int
    timestep: torch.Tensor
    alpha_bar: torch.Tensor  # cumulative alpha at ``timestep`` (scalar tensor)
    latents: torch.Tensor  # x_t, the whole batch
    prediction_type: str  # what the network predicts: "epsilon" or "v_prediction"


class Guidance(Protocol):
    def reset(self, batch_size: int, num_steps: int) -> None: ...

    def plan(self, step: Step) -> torch.Tensor:
        """Bool (B,): samples whose unconditional branch is evaluated on this step."""

    def uncond(self, step: Step, cond: torch.Tensor, uncond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What takes the unconditional prediction's place (B, ...), given ``cond`` (B, ...) and the evaluated
        ``uncond`` (mask.sum(), ...)."""


def to_space(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str, space: str):
    """Converts a network prediction (epsilon or v) at x_t into the epsilon, x0 or v parameterisation."""
    a, s = alpha_bar.sqrt().to(pred), (1 - alpha_bar).sqrt().to(pred)
    if prediction_type == "epsilon":
        eps = pred
    elif prediction_type == "v_prediction":
        eps = a * pred + s * x_t
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
    if space == "epsilon":
        return eps
    x0 = (x_t - s * eps) / a
    if space == "x0":
        return x0
    if space == "v":
        return a * eps - s * x0
    raise ValueError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")


def guidance_cosine(cond, uncond, x_t, alpha_bar, prediction_type: str, space: str) -> torch.Tensor:
    """gamma_t = cos(cond, uncond) per sample, in fp32 (a flattened dot product can overflow fp16)."""
    c = to_space(cond.float(), x_t.float(), alpha_bar.float(), prediction_type, space).flatten(1)
    u = to_space(uncond.float(), x_t.float(), alpha_bar.float(), prediction_type, space).flatten(1)
    return torch.nn.functional.cosine_similarity(c, u, dim=1)


@dataclass
class CFG:
    """Plain classifier-free guidance (2 NFE per step)."""

    def reset(self, batch_size: int, num_steps: int) -> None:
        self.batch_size = batch_size

    def plan(self, step: Step) -> torch.Tensor:
        return torch.ones(self.batch_size, dtype=torch.bool)

    def uncond(self, step: Step, cond, uncond, mask):
        return uncond


@dataclass
class Conditional:
    """Conditional prediction only (1 NFE per step); what diffusers does at guidance_scale <= 1."""

    def reset(self, batch_size: int, num_steps: int) -> None:
        self.batch_size = batch_size

    def plan(self, step: Step) -> torch.Tensor:
        return torch.zeros(self.batch_size, dtype=torch.bool)

    def uncond(self, step: Step, cond, uncond, mask):
        return cond  # u + s (c - u) = c exactly


@dataclass
class FixedCutoff:
    """CFG for the first ``cfg_steps`` steps, conditional only afterwards: the fixed-step baseline of AG."""

    cfg_steps: int

    def reset(self, batch_size: int, num_steps: int) -> None:
        self.batch_size = batch_size

    def plan(self, step: Step) -> torch.Tensor:
        return torch.full((self.batch_size,), step.index < self.cfg_steps, dtype=torch.bool)

    def uncond(self, step: Step, cond, uncond, mask):
        return uncond if step.index < self.cfg_steps else cond


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
        if self.space not in SPACES:
            raise ValueError(f"unknown space {self.space!r}; choose one of {', '.join(SPACES)}")
        if self.min_cfg_steps < 0:
            raise ValueError(f"min_cfg_steps must be >= 0, got {self.min_cfg_steps}")

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


# ---------------------------------------------------------------------------------------------------------------------
# LinearAG


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
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "features": LINEAR_AG_FEATURES,
                    "settings": self.settings,
                    "coefficients": {str(k): v for k, v in self.coefficients.items()},
                },
                indent=1,
            )
        )
        os.replace(tmp, path)
        return path

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


# ---------------------------------------------------------------------------------------------------------------------
# Running a policy inside any diffusers text-to-image pipeline


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
    raise ValueError(f"unknown guidance {kind!r}; choose 'cfg', 'ag' or 'linear_ag'")


def sampling_settings(scheduler, guidance_scale: float, linear_until: float) -> dict:
    """The settings LinearAG coefficients are valid for (read after ``scheduler.set_timesteps``)."""
    return {
        "scheduler": type(scheduler).__name__,
        "timesteps": [int(t) for t in scheduler.timesteps],
        "prediction_type": scheduler.config.get("prediction_type", "epsilon"),
        "guidance_scale": float(guidance_scale),
        "linear_until": float(linear_until),
    }


class GuidanceHook(ModelHook):
    """Runs the UNet on the rows a policy asks for and fills in the unconditional rows it skipped.

    The stock pipelines batch [uncond (B), cond (B)] under CFG; any tensor argument batched that way is sliced alike.
    With only B rows (no CFG) the call passes through. ``nfe`` counts network evaluations per sample.
    """

    def __init__(self, policy: Guidance, scheduler, batch_size: int):
        super().__init__()
        self.policy, self.scheduler, self.batch = policy, scheduler, batch_size
        self.index = 0
        self.nfe = torch.zeros(batch_size, dtype=torch.long)

    def new_forward(self, module, sample, timestep, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if len(sample) != 2 * self.batch:  # not a CFG batch
            self.nfe += 1
            return forward(sample, timestep, *args, **kwargs)
        if self.index == 0:
            self.policy.reset(self.batch, len(self.scheduler.timesteps))
        t = timestep if not torch.is_tensor(timestep) or timestep.ndim == 0 else timestep[0]
        alpha_bar = self.scheduler.alphas_cumprod[int(t)]
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        step = Step(self.index, len(self.scheduler.timesteps), t, alpha_bar, sample[self.batch :], prediction_type)
        mask = self.policy.plan(step)
        rows = torch.cat([mask.nonzero().flatten(), self.batch + torch.arange(self.batch)]).to(sample.device)

        def pick(value):
            if isinstance(value, dict):
                return {k: pick(v) for k, v in value.items()}
            if torch.is_tensor(value) and value.ndim > 0 and len(value) == 2 * self.batch:
                return value[rows.to(value.device)]
            return value

        return_dict = kwargs.pop("return_dict", True)
        out = forward(
            pick(sample),
            pick(timestep),
            *[pick(a) for a in args],
            **{k: pick(v) for k, v in kwargs.items()},
            return_dict=False,
        )[0]
        k = int(mask.sum())
        cond, uncond = out[k:], out[:k]
        full = torch.cat([self.policy.uncond(step, cond, uncond, mask).to(out.dtype), cond])
        self.nfe += 1 + mask.long()
        self.index += 1
        return UNet2DConditionOutput(sample=full) if return_dict else (full,)


@contextmanager
def guided(unet, policy: Guidance, scheduler, batch_size: int):
    """Installs ``policy`` on ``unet`` for one sampling run; always removed afterwards, whatever happens."""
    hook = GuidanceHook(policy, scheduler, batch_size)
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    registry.register_hook(hook, "genreg_guidance")
    try:
        yield hook
    finally:
        registry.remove_hook("genreg_guidance", recurse=False)


class CalibrationRecorder(CFG):
    """Plain CFG that records gamma_t (in every space) and feeds a LinearAG fitter: the calibration run's policy."""

    def __init__(self, fitter: LinearAGFitter | None = None):
        self.fitter = fitter
        self.gammas: dict[str, list[torch.Tensor]] = {space: [] for space in SPACES}

    def uncond(self, step: Step, cond, uncond, mask):
        for space, values in self.gammas.items():
            values.append(
                guidance_cosine(cond, uncond, step.latents, step.alpha_bar, step.prediction_type, space).cpu()
            )
        if self.fitter is not None:
            self.fitter.observe(step.index, cond, uncond)
        return uncond


def stock_call(pipe) -> Callable:
    """The diffusers ``__call__`` of ``pipe``'s class, bound to ``pipe``, skipping any genreg mixin above it."""
    for cls in type(pipe).__mro__:
        if cls.__module__.startswith("diffusers.") and "__call__" in vars(cls):
            return vars(cls)["__call__"].__get__(pipe)
    raise TypeError(f"{type(pipe).__name__} is not a diffusers pipeline")


def guided_call(
    call: Callable, pipe, policy: Guidance, prompt=None, **kwargs
) -> tuple[object, list[int], torch.Tensor | None]:
    """Calls a stock text-to-image pipeline's ``__call__`` (``call``) under ``policy``.

    Returns the pipeline's output (``return_dict=True``), the NFE of each image, and AG's gamma_t per step and image
    (NaN where not measured) or None. LinearAG coefficients are checked against the sampling settings first.
    """
    defaults = inspect.signature(call).parameters

    def arg(name):
        return kwargs.get(name, defaults[name].default if name in defaults else None)

    if prompt is not None:
        batch = 1 if isinstance(prompt, str) else len(prompt)
    elif kwargs.get("prompt_embeds") is not None:
        batch = len(kwargs["prompt_embeds"])
    else:
        raise ValueError("pass a prompt (or prompt_embeds)")
    batch *= arg("num_images_per_prompt") or 1
    if isinstance(policy, LinearAG):
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        retrieve_timesteps(pipe.scheduler, arg("num_inference_steps"), "cpu", arg("timesteps"), arg("sigmas"))
        policy.coefficients.check(sampling_settings(pipe.scheduler, arg("guidance_scale"), policy.linear_until))
    with guided(pipe.unet, policy, pipe.scheduler, batch) as hook:
        out = call(prompt, **(kwargs | {"return_dict": True}))
    gammas = getattr(policy, "gammas", None)
    gammas = torch.stack(gammas) if isinstance(gammas, list) and gammas else None
    return out, hook.nfe.tolist(), gammas


def switch_nfe(gammas: torch.Tensor, gamma_bar: float, min_cfg_steps: int = 1) -> torch.Tensor:
    """AG's NFE per sample, from gamma_t recorded under full CFG (steps, samples): AG follows the CFG trajectory
    exactly until it switches, so this is what AG will spend on the same prompts and seeds."""
    steps = len(gammas)
    crossed = gammas >= gamma_bar
    crossed[: max(0, min_cfg_steps - 1)] = False
    first = torch.where(crossed.any(0), crossed.float().argmax(0), torch.full((gammas.shape[1],), steps))
    return torch.where(first < steps, steps + first + 1, torch.full_like(first, 2 * steps))


def gamma_bar_for_nfe(gammas: torch.Tensor, target_nfe: float, min_cfg_steps: int = 1) -> float:
    """The largest gamma_bar whose mean NFE (``switch_nfe``) stays within ``target_nfe``."""
    for candidate in torch.unique(gammas[torch.isfinite(gammas)]).flip(0).tolist():
        if switch_nfe(gammas, candidate, min_cfg_steps).float().mean() <= target_nfe:
            return candidate
    return float("-inf")


def calibrate(
    pipe,
    prompts: list[str],
    num_inference_steps: int,
    guidance_scale: float,
    linear_until: float = 0.5,
    seed: int = 0,
    batch_size: int = 50,
) -> tuple[dict[str, torch.Tensor], LinearAGCoefficients]:
    """Runs CFG over ``prompts`` (image k seeded with seed + k); returns gamma_t (steps, prompts) per space and the
    LinearAG coefficients fitted on the same trajectories."""
    fitter = LinearAGFitter(num_inference_steps, linear_until)
    gammas: dict[str, list[torch.Tensor]] = {space: [] for space in SPACES}
    for i in range(0, len(prompts), batch_size):
        recorder = CalibrationRecorder(fitter)
        chunk = prompts[i : i + batch_size]
        generator = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        guided_call(
            stock_call(pipe),
            pipe,
            recorder,
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="latent",
        )
        for space in SPACES:
            gammas[space].append(torch.stack(recorder.gammas[space]))
    settings = sampling_settings(pipe.scheduler, guidance_scale, linear_until)
    return {space: torch.cat(g, dim=1) for space, g in gammas.items()}, fitter.fit(settings)

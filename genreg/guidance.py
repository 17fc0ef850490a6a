"""The guidance protocol: classifier-free guidance and the policies that speed it up, run inside any diffusers
text-to-image pipeline.

A policy decides, step by step and sample by sample, whether the unconditional branch is evaluated (``plan``), and
what stands in for it (``uncond``): the pipeline's own CFG line ``u + s (c - u)`` then makes the guided prediction,
so with ``u = c`` a step is conditional-only, exactly. ``guided(unet, policy, scheduler)`` installs the policy as a
diffusers model hook for the length of one pipeline call: the UNet then runs only on the rows the policy asks for,
so a skipped branch costs nothing, and every stock text-to-image pipeline (SD 1.x/2.x, SDXL) gains the policy.

Here live the protocol, the hook and the baselines: ``CFG`` (Ho & Salimans, 2022: eps = eps_u + s (eps_c - eps_u),
both branches at every step), ``Conditional`` and ``FixedCutoff``. Methods bring their own policies (Adaptive
Guidance and LinearAG: ``genreg.methods.adaptive_guidance``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .sd import to_space


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

    # Optional: ``check_sampling(scheduler, guidance_scale)``, called once the scheduler's timesteps are set and
    # before any step, refuses sampling settings the policy was not made for (LinearAG's fitted coefficients).


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


# ---------------------------------------------------------------------------------------------------------------------
# Running a policy inside any diffusers text-to-image pipeline


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

        def pick(value):  # every per-sample input: tensors, and those inside dicts, lists and tuples
            if isinstance(value, dict):
                return {k: pick(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):  # IP-Adapter image embeddings, ControlNet residuals
                return type(value)(pick(v) for v in value)
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


def stock_class(cls: type) -> type:
    """The diffusers pipeline class that ``cls`` is or extends (the first diffusers class in its MRO with a
    ``__call__``), skipping any genreg mixin above it."""
    for base in cls.__mro__:
        if base.__module__.startswith("diffusers.") and "__call__" in vars(base):
            return base
    raise TypeError(f"{cls.__name__} is not a diffusers pipeline")


def stock_call(pipe) -> Callable:
    """The diffusers ``__call__`` of ``pipe``'s class, bound to ``pipe``."""
    return vars(stock_class(type(pipe)))["__call__"].__get__(pipe)


def guided_call(
    call: Callable, pipe, policy: Guidance, prompt=None, **kwargs
) -> tuple[object, list[int], torch.Tensor | None]:
    """Calls a stock text-to-image pipeline's ``__call__`` (``call``) under ``policy``.

    Returns the pipeline's output (``return_dict=True``), the NFE of each image, and AG's gamma_t per step and image
    (NaN where not measured) or None. A policy's ``check_sampling`` runs first.
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
    check = getattr(policy, "check_sampling", None)
    if check is not None:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        retrieve_timesteps(pipe.scheduler, arg("num_inference_steps"), "cpu", arg("timesteps"), arg("sigmas"))
        check(pipe.scheduler, arg("guidance_scale"))
    with guided(pipe.unet, policy, pipe.scheduler, batch) as hook:
        out = call(prompt, **(kwargs | {"return_dict": True}))
    gammas = getattr(policy, "gammas", None)
    gammas = torch.stack(gammas) if isinstance(gammas, list) and gammas else None
    return out, hook.nfe.tolist(), gammas

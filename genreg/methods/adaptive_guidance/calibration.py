"""Calibrating Adaptive Guidance for a model: gamma_t curves under CFG, the gamma_bar that spends a given NFE
budget, and LinearAG's least-squares coefficients fitted on the same trajectories."""

from __future__ import annotations

import torch

from ...guidance import CFG, Step, guidance_cosine, guided_call, stock_call
from ...sd import SPACES
from .policies import LinearAGCoefficients, LinearAGFitter, sampling_settings


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

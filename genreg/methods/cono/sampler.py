"""CoNo's sampler over a stock AnimateDiff pipeline: clips drawn one after another, each steered by the one before.

A video starts with one clip; every later stage draws a clip of the same length from a shuffle of the same noise
group, with the predicted noise of its guided frames taken from the stage before (the look-back) and its mean over
frames pulled toward the stage before (the regularization). With the internal stage, each extension is three stages:
extending stage 1, the internal stage (whose middle frames are the transition) and extending stage 2. The frames
kept are the first clip, then per extension the internal stage after its guided frames and stage 2 after its guided
frames; without it, extending stage 1 after its guided frames. Only two stages' predicted noise is held at a time, so
memory is bounded by a clip, not by the video.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from ...guidance import CFG, Conditional, Guidance, Step
from ...inversion import step_alphas
from ...sd import to_space
from .config import CoNoSettings
from .core import consistency_gradient, extending_shuffle, internal_shuffle, video_plan


@dataclass
class Stage:
    """One denoised clip: its noise order, final latents, and per step the predicted noise of every frame (B, C, N,
    H, W) and its mean over frames, which later stages are steered by."""

    order: list[int]
    latents: torch.Tensor
    eps: list[torch.Tensor] = field(default_factory=list)
    means: list[torch.Tensor] = field(default_factory=list)


@dataclass
class CoNoResult:
    """The video's frames (F, H, W, 3) in [0, 1], the prompt index of each frame, the frames where a newly drawn clip's
    frames begin, and the network evaluations and clip stages it took."""

    frames: np.ndarray
    prompt_of_frame: list[int]
    clip_starts: list[int]
    nfe: int
    stages: int
    seconds: float


class CoNoSampler:
    """Runs CoNo on ``pipe`` (an AnimateDiffPipeline or a view of one); DDIM with eta 0, as the method needs (the
    pipeline's scheduler config, as DDIM). ``guidance`` is a ``genreg.guidance`` policy, run per clip."""

    def __init__(self, pipe, settings: CoNoSettings, guidance: Guidance | None = None, clip: int = 16):
        self.pipe, self.settings, self.clip = pipe, settings, clip
        settings.check_clip(clip)
        self.guidance = guidance
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.nfe = 0

    # -- one clip --------------------------------------------------------------------------------------------------

    def _eps(self, latents, t, index: int, num_steps: int, cond, uncond, scale: float, policy: Guidance):
        """The guided prediction as predicted noise, in float32; the policy decides whether uncond is evaluated."""
        alpha_bar = self.scheduler.alphas_cumprod[int(t)]
        kind = self.scheduler.config.prediction_type
        step = Step(index, num_steps, t, alpha_bar, latents, kind)
        evaluate = bool(policy.plan(step)[0])
        frames = latents.shape[2]
        emb = torch.cat([uncond, cond]) if evaluate else cond
        x = torch.cat([latents] * 2) if evaluate else latents
        out = self.pipe.unet(x, t, encoder_hidden_states=emb.repeat_interleave(frames, dim=0)).sample.float()
        self.nfe += 1 + evaluate
        c = out[-1:]
        u = policy.uncond(step, c, out[:1] if evaluate else out[:0], torch.tensor([evaluate])).float()
        pred = u + scale * (c - u)
        return to_space(pred, latents.float(), alpha_bar, kind, "epsilon")

    def denoise(
        self,
        noise: torch.Tensor,
        order: list[int],
        cond,
        uncond,
        scale: float,
        steps: int,
        guides: dict[int, tuple[Stage, int]],
        reference: Stage | None,
    ) -> Stage:
        """One clip from the noise frames in ``order``; ``guides`` maps a frame position to (stage, its frame) whose
        stored predicted noise it takes during the look-back; ``reference`` is the stage the frames' mean is pulled
        toward. Returns the stage with its per-step predicted noise."""
        s = self.settings
        self.scheduler.set_timesteps(steps, device=noise.device)
        latents = noise[:, :, order] * self.scheduler.init_noise_sigma
        # At guidance_scale <= 1 there is no unconditional branch to evaluate (as in diffusers).
        policy = (self.guidance or CFG()) if scale > 1 else Conditional()
        policy.reset(1, steps)
        stage = Stage(order, latents)
        look_back = int(round(s.look_back * steps))
        start, end = (int(round(f * steps)) for f in s.consistency_steps)
        positions = sorted(guides)
        free = [f for f in range(latents.shape[2]) if f not in guides]
        bar = self.pipe.progress_bar(total=steps)  # the pipeline's bar (and whatever reports through it)
        for i, t in enumerate(self.scheduler.timesteps):
            eps = self._eps(latents, t, i, steps, cond, uncond, scale, policy)
            looking = i < look_back and guides
            if looking:  # (2) the guided frames take the stored predicted noise at this step
                eps[:, :, positions] = torch.stack([guides[p][0].eps[i][:, :, guides[p][1]] for p in positions], dim=2)
            if reference is not None and s.consistency_scale > 0 and start <= i < end:  # (1) long-term consistency
                update = s.consistency_scale * consistency_gradient(eps, reference.means[i], s.reduction)
                rows = free if looking else list(range(eps.shape[2]))
                eps[:, :, rows] -= update[:, :, rows]
            stage.eps.append(eps)
            stage.means.append(eps.mean(dim=2, keepdim=True))
            alpha, alpha_prev = (a.to(latents.device) for a in step_alphas(self.scheduler, t))
            x0 = to_space(eps, latents.float(), alpha, "epsilon", "x0")
            latents = (alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps).to(latents.dtype)
            bar.update()
        bar.close()
        stage.latents = latents
        return stage

    # -- the video -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        num_frames: int,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> CoNoResult:
        """A ``num_frames`` video whose stages share the prompts in order (one prompt: a long single-prompt video)."""
        if not prompts or any(not p or not p.strip() for p in prompts):
            raise ValueError("give one prompt or more, none empty")
        pipe, s, n = self.pipe, self.settings, self.clip
        started, self.nfe = time.perf_counter(), 0
        device = pipe._execution_device
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        height, width = height or size, width or size
        plan, owner, starts = video_plan(len(prompts), num_frames, n, s.guided_frames, s.internal_stage)
        conds = [
            pipe.encode_prompt(p, device, 1, guidance_scale > 1, negative_prompt)[:2] for p in prompts
        ]  # (cond, uncond) per prompt, each (1, L, D)
        shape = (1, pipe.unet.config.in_channels, n, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=pipe.unet.dtype)

        def draw(order, k, guides, reference):
            cond, uncond = conds[k]
            return self.denoise(noise, order, cond, uncond, guidance_scale, num_inference_steps, guides, reference)

        prev = draw(list(range(n)), plan[0], {}, None)
        kept = [self._decode(prev.latents)]
        n1, n2 = s.guided_frames, s.right_frames
        for k in plan[1:]:
            tail = {j: (prev, n - n1 + j) for j in range(n1)} if s.look_back > 0 else {}
            first = draw(extending_shuffle(prev.order, n1), k, tail, prev)
            if not s.internal_stage:
                kept.append(self._decode(first.latents[:, :, n1:]))
                prev = first
                continue
            right = {n - n2 + j: (first, n1 + j) for j in range(n2)} if s.look_back > 0 else {}
            middle = draw(internal_shuffle(first.order, n1, n2), k, tail | right, first)
            lead = {j: (middle, n - n1 + j) for j in range(n1)} if s.look_back > 0 else {}
            del first, right  # only two stages are held at a time
            second = draw(extending_shuffle(middle.order, n1), k, lead, middle)
            kept += [self._decode(middle.latents[:, :, n1:]), self._decode(second.latents[:, :, n1:])]
            prev = second
        frames = np.concatenate(kept)[:num_frames]
        stages = 1 + len(plan[1:]) * (3 if s.internal_stage else 1)
        return CoNoResult(frames, owner, starts, self.nfe, stages, time.perf_counter() - started)

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        """(F, H, W, 3) float in [0, 1]."""
        video = self.pipe.decode_latents(latents.to(self.pipe.vae.dtype))
        return self.pipe.video_processor.postprocess_video(video=video, output_type="np")[0]

"""CoNo: the shuffles as permutations, the closed-form consistency step, and the sampler on tiny random components."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genreg.methods.cono import (
    CoNoSampler,
    CoNoSettings,
    consistency_gradient,
    extending_shuffle,
    internal_shuffle,
    video_plan,
)


def test_extending_shuffle_starts_with_the_last_guided_noises_in_order_and_keeps_the_group():
    order = list(range(16))
    new = extending_shuffle(order, 6)
    assert new[:6] == order[-6:] and new[6:] == list(range(9, -1, -1))
    assert sorted(new) == order
    shuffled = [3, 1, 4, 15, 9, 2, 6, 5, 0, 8, 7, 10, 11, 14, 13, 12]
    assert extending_shuffle(shuffled, 6)[:6] == shuffled[-6:]


def test_internal_shuffle_keeps_the_left_and_moves_stage_one_frames_to_the_right():
    order = extending_shuffle(list(range(16)), 6)
    new = internal_shuffle(order, 6, 8)
    assert new[:6] == order[:6] and new[-8:] == order[6:14] and new[6:8] == order[14:]
    assert sorted(new) == list(range(16))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_consistency_gradient_is_the_gradient_of_the_squared_mean_error(reduction):
    torch.manual_seed(0)
    eps = torch.randn(1, 4, 16, 5, 6, requires_grad=True)
    reference = torch.randn(1, 4, 1, 5, 6)
    error = (reference - eps.mean(dim=2, keepdim=True)).square()
    (error.sum() if reduction == "sum" else error.mean()).backward()
    assert torch.allclose(consistency_gradient(eps.detach(), reference, reduction), eps.grad, atol=1e-6)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        consistency_gradient(eps.detach(), reference, "max")


def test_a_full_consistency_step_lands_the_mean_on_the_reference():
    eps, reference = torch.randn(1, 4, 16, 3, 3), torch.randn(1, 4, 1, 3, 3)
    moved = eps - 16 / 2 * consistency_gradient(eps, reference, "sum")  # delta = N/2: the whole way
    assert torch.allclose(moved.mean(dim=2, keepdim=True), reference, atol=1e-6)


def test_the_plan_shares_stages_among_prompts_and_marks_where_clips_begin():
    assert video_plan(1, 16, 16, 6, True) == ([0], [0] * 16, [])
    prompts, owner, starts = video_plan(3, 56, 16, 6, True)
    assert prompts == [0, 1, 2] and owner == [0] * 16 + [1] * 20 + [2] * 20 and starts == [16, 26, 36, 46]
    assert video_plan(2, 96, 16, 6, True)[0] == [0, 0, 0, 1, 1]
    prompts, owner, starts = video_plan(1, 30, 16, 6, False)
    assert prompts == [0, 0, 0] and len(owner) == 30 and starts == [16, 26]
    with pytest.raises(ValueError, match="3 prompts need at least 56 frames"):
        video_plan(3, 40, 16, 6, True)


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="share of the steps"):
        CoNoSettings(look_back=1.5)
    with pytest.raises(ValueError, match="reduction must be one of mean, sum"):
        CoNoSettings(reduction="max")
    with pytest.raises(ValueError, match="must stay below 16 and N1 \\+ right_frames"):
        CoNoSettings(guided_frames=8, right_frames=8).check_clip(16)


# ---------------------------------------------------------------------------------------------------------------------
# the sampler on tiny random components


@pytest.fixture(scope="module")
def video_pipe():
    from diffusers import AnimateDiffPipeline, StableDiffusionPipeline

    from genreg.testing import tiny_motion_adapter, tiny_sd_components

    base = StableDiffusionPipeline(**tiny_sd_components())
    pipe = AnimateDiffPipeline.from_pipe(base, motion_adapter=tiny_motion_adapter())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(pipe, prompt: str):
    return pipe.encode_prompt(prompt, "cpu", 1, True)[:2]


def test_with_the_look_back_on_every_step_guided_frames_reproduce_the_previous_tail(video_pipe):
    sampler = CoNoSampler(video_pipe, CoNoSettings(look_back=1.0), clip=16)
    noise = torch.randn(1, 4, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond = embeds(video_pipe, "a red circle moving to the right")
    prev = sampler.denoise(noise, list(range(16)), cond, uncond, 5.0, 3, {}, None)
    cond2, uncond2 = embeds(video_pipe, "a blue square moving up")
    tail = {j: (prev, 10 + j) for j in range(6)}
    new = sampler.denoise(noise, extending_shuffle(prev.order, 6), cond2, uncond2, 5.0, 3, tail, prev)
    assert torch.equal(new.latents[:, :, :6], prev.latents[:, :, 10:])
    assert not torch.allclose(new.latents[:, :, 6:7], prev.latents[:, :, 9:10])  # the rest is drawn anew
    free = CoNoSampler(video_pipe, CoNoSettings(look_back=0.0), clip=16)
    unguided = free.denoise(noise, extending_shuffle(prev.order, 6), cond2, uncond2, 5.0, 3, {}, prev)
    assert not torch.equal(unguided.latents[:, :, :6], prev.latents[:, :, 10:])


def test_a_video_has_the_asked_length_its_prompts_in_order_and_is_seeded(video_pipe):
    from genreg.pipelines import CoNoPipeline

    pipe = CoNoPipeline.from_pipe(video_pipe)
    prompts = ["a red circle moving to the right", "a red circle moving to the left"]
    kwargs = {"num_frames": 36, "num_inference_steps": 2, "guidance_scale": 5.0}
    out = pipe(prompts, generator=torch.Generator().manual_seed(1), **kwargs)
    again = pipe(prompts, generator=torch.Generator().manual_seed(1), **kwargs)
    assert out.frames.shape == (1, 36, 32, 32, 3) and np.array_equal(out.frames, again.frames)
    assert out.prompt_of_frame == [0] * 16 + [1] * 20 and out.clip_starts == [16, 26]
    assert out.nfe == 4 * 2 * 2  # the first clip + one extension of three stages; 2 steps of 2 NFE each
    plain = pipe(prompts, internal_stage=False, num_frames=26, num_inference_steps=2, guidance_scale=5.0)
    assert plain.frames.shape[1] == 26 and plain.nfe == 2 * 2 * 2
    pil = pipe("a red circle moving up", num_frames=16, num_inference_steps=1, output_type="pil")
    assert len(pil.frames[0]) == 16 and pil.frames[0][0].size == (32, 32)
    with pytest.raises(TypeError, match="unknown CoNo setting"):
        pipe("a red circle", look_forward=3)
    with pytest.raises(ValueError, match="2 prompts need at least 36 frames"):
        pipe(prompts, num_frames=20, num_inference_steps=1)


def test_adaptive_guidance_composes_per_clip_and_saves_evaluations(video_pipe):
    from genreg.pipelines import CoNoPipeline

    pipe = CoNoPipeline.from_pipe(video_pipe)
    kwargs = {"num_frames": 36, "num_inference_steps": 4, "guidance_scale": 5.0}
    cfg = pipe("a red circle moving to the right", guidance="cfg", **kwargs)
    ag = pipe("a red circle moving to the right", guidance="ag", gamma_bar=-1.0, **kwargs)  # switches at once
    assert ag.nfe < cfg.nfe == 4 * 4 * 2


def test_a_learnt_token_composes_with_cono():
    """A token loaded with the standard loader reaches the prompts of the clips: another vector, another video."""
    from diffusers import AnimateDiffPipeline, StableDiffusionPipeline
    from genreg.pipelines import CoNoPipeline

    from genreg.testing import tiny_motion_adapter, tiny_sd_components

    videos = []
    for seed in (0, 1):
        base = StableDiffusionPipeline(**tiny_sd_components())
        video = AnimateDiffPipeline.from_pipe(base, motion_adapter=tiny_motion_adapter())
        width = video.text_encoder.get_input_embeddings().weight.shape[1]
        video.load_textual_inversion({"<subject>": torch.randn(width, generator=torch.Generator().manual_seed(seed))})
        pipe = CoNoPipeline.from_pipe(video)
        pipe.set_progress_bar_config(disable=True)
        prompts = ["a <subject> moving to the right", "a <subject> moving up"]
        out = pipe(prompts, num_frames=36, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        videos.append(out.frames)
    assert videos[0].shape == (1, 36, 32, 32, 3) and not np.allclose(videos[0], videos[1])

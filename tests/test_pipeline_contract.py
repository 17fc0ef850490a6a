"""The diffusers contract of genreg's pipelines: a user swaps one in for the stock pipeline and nothing else changes.
Checked on tiny SD and SDXL components for every genreg pipeline class."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from genreg.pipelines import (
    AdaptiveGuidancePipeline,
    AdaptiveGuidanceXLPipeline,
    GuideAndRescalePipeline,
    GuideAndRescaleXLPipeline,
)

from genreg.guidance import CFG, guided
from genreg.testing import tiny_scheduler, tiny_sd_components, tiny_sdxl_components

TEXT_TO_IMAGE = [
    (AdaptiveGuidancePipeline, StableDiffusionPipeline, tiny_sd_components),
    (AdaptiveGuidanceXLPipeline, StableDiffusionXLPipeline, tiny_sdxl_components),
]
ALL = TEXT_TO_IMAGE + [
    (GuideAndRescalePipeline, StableDiffusionPipeline, tiny_sd_components),
    (GuideAndRescaleXLPipeline, StableDiffusionXLPipeline, tiny_sdxl_components),
]


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=TEXT_TO_IMAGE, ids=lambda p: p[0].__name__)
def pair(request):
    genreg_cls, stock_cls, components = request.param
    stock = quiet(stock_cls(**components()))
    return quiet(genreg_cls.from_pipe(stock)), stock


def test_the_signature_is_the_stock_one_plus_genregs_keywords(pair):
    pipe, stock = pair
    ours, theirs = inspect.signature(type(pipe).__call__), inspect.signature(type(stock).__call__)
    stock_params = [p for p in theirs.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert list(ours.parameters.values())[: len(stock_params)] == stock_params  # same order, defaults, kinds
    extra = [p for p in ours.parameters.values() if p.name not in theirs.parameters]
    assert [p.name for p in extra][:2] == ["guidance", "gamma_bar"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert (type(stock).__call__.__doc__ or "").strip()[:60] in type(pipe).__call__.__doc__


def test_positional_calls_and_the_tuple_are_the_stock_ones(pair):
    pipe, stock = pair
    args = ("a red circle on the left", 32, 32, 3)  # prompt, height, width, num_inference_steps (SD order)
    if isinstance(stock, StableDiffusionXLPipeline):
        args = ("a red circle on the left", None, 32, 32, 3)  # SDXL: prompt, prompt_2, height, width, steps
    want = stock(*args, generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False)
    got = pipe(*args, guidance="cfg", generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1:] == want[1:]  # SD: (images, nsfw flags = None); SDXL: (images,)
    out = pipe(*args, generator=torch.Generator().manual_seed(0), output_type="np")  # AG, the default
    assert out.images.shape == want[0].shape and len(out.nfe) == 1


@pytest.mark.parametrize("genreg_cls, stock_cls, components", ALL, ids=lambda v: getattr(v, "__name__", ""))
def test_a_saved_pipeline_loads_with_plain_diffusers(tmp_path, genreg_cls, stock_cls, components):
    pipe = genreg_cls(**components())
    pipe.save_pretrained(tmp_path)
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is stock_cls
    assert type(genreg_cls.from_pretrained(tmp_path)) is genreg_cls


def test_guidance_must_be_a_name_or_a_policy(pair):
    pipe, _ = pair
    for bad in (None, 3):
        with pytest.raises(ValueError, match="guidance must be"):
            pipe("a red circle", num_inference_steps=2, guidance=bad)


def test_dropped_branches_slice_list_valued_inputs_too():
    """IP-Adapter image embeddings arrive as a list of (2B, ...) tensors: a skipped unconditional row must leave
    every list entry too, or the conditional rows would read the unconditional images."""
    unet = tiny_sd_components()["unet"]
    seen = []

    def forward(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
        seen.append((len(sample), [len(e) for e in added_cond_kwargs["image_embeds"]]))
        return (torch.zeros_like(sample),)

    unet.forward = forward
    scheduler = tiny_scheduler()
    scheduler.set_timesteps(2)

    class NoUncond(CFG):
        def plan(self, step):
            return torch.tensor([False, True])

        def uncond(self, step, cond, uncond, mask):
            return cond

    with guided(unet, NoUncond(), scheduler, batch_size=2):
        unet(
            torch.zeros(4, 4, 8, 8),
            scheduler.timesteps[0],
            encoder_hidden_states=torch.zeros(4, 77, 32),
            added_cond_kwargs={"image_embeds": [torch.zeros(4, 1, 8), torch.zeros(4, 2, 8)]},
        )
    assert seen == [(3, [3, 3])]  # one unconditional row and two conditional ones, in every input

"""The tiny SD 1.x / 2.x / SDXL components later method tests build on."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from genreg.testing import tiny_sd_components, tiny_sdxl_components


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_tiny_sd_runs_and_is_deterministic(prediction_type):
    pipe = StableDiffusionPipeline(**tiny_sd_components(prediction_type=prediction_type))
    pipe.set_progress_bar_config(disable=True)

    def run():
        gen = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=2, output_type="np", generator=gen).images

    a, b = run(), run()
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert pipe.scheduler.config.prediction_type == prediction_type


def test_tiny_sd_is_seeded():
    a = tiny_sd_components(seed=0)["unet"].conv_in.weight
    b = tiny_sd_components(seed=0)["unet"].conv_in.weight
    c = tiny_sd_components(seed=1)["unet"].conv_in.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tiny_sdxl_runs_with_two_text_encoders(tmp_path):
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_2.config.projection_dim == 32
    out = pipe(
        "a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    pipe.save_pretrained(tmp_path)
    again = StableDiffusionXLPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    out2 = again(
        "a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    np.testing.assert_allclose(out, out2, atol=1e-6)

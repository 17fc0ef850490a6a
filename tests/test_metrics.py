"""The memorization and quality metrics of genreg.metrics, each against its definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from genreg.metrics import extraction_rate, frechet_distance, nearest_training, text_noise_norm
from genreg.testing import tiny_sd_components, tiny_sdxl_components


def test_the_frechet_distance_of_diagonal_gaussians_is_mean_gap_plus_std_gaps():
    def spread(stds: list[float], mean: list[float]) -> torch.Tensor:  # +-s_i e_i: mean 0, covariance diagonal
        rows = [sign * s * torch.eye(len(stds))[i] for i, s in enumerate(stds) for sign in (1, -1)]
        return torch.stack(rows) + torch.tensor(mean)

    a, b = spread([1.0, 2.0, 3.0], [0, 0, 0]), spread([2.0, 2.0, 1.0], [1.0, 0, 2.0])
    var_a, var_b = torch.cov(a.T).diagonal(), torch.cov(b.T).diagonal()
    want = 1.0 + 4.0 + float((var_a.sqrt() - var_b.sqrt()).square().sum())
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-6)  # want is float32 arithmetic
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least two"):
        frechet_distance(a[:1], b)


def test_nearest_training_finds_the_copy_by_pixels_and_by_embedding():
    rng = np.random.default_rng(0)
    training = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(5)]
    generated = [training[3], Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8))]
    index, similarity = nearest_training(generated, training)
    assert index[0] == 3 and similarity[0] == pytest.approx(1.0) and similarity[1] < 0.9

    def embed(images) -> torch.Tensor:  # mean colour: enough to tell these images apart
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).mean((0, 1)) for im in images])

    index, similarity = nearest_training(generated, training, embed=embed)
    assert index[0] == 3 and similarity[0] == pytest.approx(1.0)
    assert extraction_rate(torch.tensor([0.99, 0.5, 0.97, 0.2]), 0.95) == 0.5
    with pytest.raises(ValueError, match="same size"):
        nearest_training(generated, [training[0].resize((4, 4))])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_text_noise_norm_is_the_conditional_minus_unconditional_epsilon_norm(prediction_type):
    pipe = StableDiffusionPipeline(**tiny_sd_components(0, prediction_type))
    norms = text_noise_norm(pipe, ["a red circle", "a blue star"], steps=1, num_inference_steps=10, seed=3)
    assert norms.shape == (2,) and (norms > 0).all()
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    cond, uncond = pipe.encode_prompt("a red circle", "cpu", 1, True)
    with torch.no_grad():
        pred_c, pred_u = (pipe.unet(x, t, e).sample for e in (cond, uncond))
    a = scheduler.alphas_cumprod[int(t)]
    if prediction_type == "v_prediction":  # epsilon = sqrt(a) v + sqrt(1 - a) x
        pred_c, pred_u = (a.sqrt() * p + (1 - a).sqrt() * x for p in (pred_c, pred_u))
    assert float(norms[0]) == pytest.approx(float((pred_c - pred_u).norm()), rel=1e-4)
    more = text_noise_norm(pipe, ["a red circle"], steps=3, num_inference_steps=10, seed=3)
    assert float(more[0]) != pytest.approx(float(norms[0]))  # later steps enter the mean


def test_the_text_noise_norm_runs_on_sdxl():
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components())
    assert (text_noise_norm(pipe, ["a red circle"], steps=2, num_inference_steps=4) > 0).all()

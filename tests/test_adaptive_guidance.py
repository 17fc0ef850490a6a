import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import SDCFGCutoffCallback
from genreg.pipelines import AdaptiveGuidancePipeline, AdaptiveGuidanceXLPipeline

from genreg.cli import main
from genreg.guidance import Step, guidance_cosine
from genreg.methods.adaptive_guidance import (
    AdaptiveGuidance,
    LinearAGCoefficients,
    LinearAGFitter,
    gamma_bar_for_nfe,
    sampling_settings,
    switch_nfe,
)
from genreg.sd import to_space
from genreg.testing import tiny_sd_components, tiny_sdxl_components

KW = dict(num_inference_steps=6, guidance_scale=6.0, output_type="np")


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def base():
    pipe = StableDiffusionPipeline(**tiny_sd_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ag(base):
    pipe = AdaptiveGuidancePipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- functional ------------------------------------------------------------------------------------------------------


def test_spaces_agree_with_the_scheduler_parameterisations():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ab = torch.tensor(0.3)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    for pred, kind in ((eps, "epsilon"), (v, "v_prediction")):
        torch.testing.assert_close(to_space(pred, x_t, ab, kind, "x0"), x0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(to_space(pred, x_t, ab, kind, "epsilon"), eps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(to_space(pred, x_t, ab, kind, "v"), v, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown space"):
        to_space(eps, x_t, ab, "epsilon", "z")


def test_cosine_is_fp32_per_sample_and_survives_fp16_overflow():
    big = torch.full((2, 4, 128, 128), 200.0, dtype=torch.float16)  # the fp16 dot product would be inf
    gamma = guidance_cosine(big, big, big, torch.tensor(0.5), "epsilon", "epsilon")
    assert gamma.dtype == torch.float32 and torch.allclose(gamma, torch.ones(2))


def test_each_sample_switches_on_its_own_and_the_crossing_step_still_gets_cfg():
    policy = AdaptiveGuidance(gamma_bar=0.9, space="epsilon", min_cfg_steps=1)
    policy.reset(2, 10)
    x = torch.randn(2, 4, 4, 4)
    cond = torch.randn(2, 4, 4, 4)
    uncond = torch.stack([cond[0], -cond[1]])  # sample 0: cosine 1, sample 1: cosine -1
    step = Step(0, 10, torch.tensor(999), torch.tensor(0.5), x, "epsilon")
    mask = policy.plan(step)
    assert mask.tolist() == [True, True]
    out = policy.uncond(step, cond, uncond, mask)
    torch.testing.assert_close(out, uncond)  # the crossing step: the real unconditional prediction (CFG)
    assert policy.switched.tolist() == [True, False]
    next_step = Step(1, 10, torch.tensor(899), torch.tensor(0.6), x, "epsilon")
    mask = policy.plan(next_step)
    assert mask.tolist() == [False, True]
    out = policy.uncond(next_step, cond, uncond[1:], mask)
    torch.testing.assert_close(out[0], cond[0])  # u = c: conditional only
    torch.testing.assert_close(out[1], uncond[1])


def test_switch_nfe_and_gamma_bar_for_a_budget():
    gammas = torch.tensor([[0.5, 0.5], [0.95, 0.6], [0.99, 0.97], [0.99, 0.99]])  # 4 steps, 2 samples
    assert switch_nfe(gammas, 0.9).tolist() == [4 + 1 + 1, 4 + 2 + 1]
    assert switch_nfe(gammas, 1.5).tolist() == [8, 8]
    assert switch_nfe(gammas, 0.0, min_cfg_steps=3).tolist() == [4 + 2 + 1, 4 + 2 + 1]
    bar = gamma_bar_for_nfe(gammas, 6.5)
    assert switch_nfe(gammas, bar).float().mean() <= 6.5 and bar == pytest.approx(0.95)


def test_linear_ag_fitter_recovers_known_coefficients():
    fitter = LinearAGFitter(num_steps=6, linear_until=1.0)
    g = seeded(1)
    for _ in range(3):  # three calibration batches
        prev_c, prev_u = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
        for i in range(6):
            c = torch.randn(4, 8, generator=g)
            u = 0.5 * c + 0.2 * prev_c + 0.3 * prev_u if i in fitter.steps else torch.randn(4, 8, generator=g)
            fitter.observe(i, c, u)
            prev_c, prev_u = c, u
    coefficients = fitter.fit({"timesteps": [1, 2]})
    assert sorted(coefficients.coefficients) == [1, 3, 5]
    for b in coefficients.coefficients.values():
        assert b == pytest.approx([0.5, 0.2, 0.3], abs=1e-6)


# --- pipelines -------------------------------------------------------------------------------------------------------


def test_ag_above_one_equals_stock_cfg_exactly(base, ag):
    kwargs = dict(negative_prompt="a blue star", **KW)
    ref = base("a red circle", generator=seeded(), **kwargs).images
    out = ag("a red circle", guidance="ag", gamma_bar=1.01, generator=seeded(), **kwargs)
    np.testing.assert_array_equal(out.images, ref)
    assert out.nfe == [12]
    plain = ag("a red circle", guidance="cfg", generator=seeded(), **kwargs)
    np.testing.assert_array_equal(plain.images, ref)


def test_immediate_switch_equals_conditional_sampling_after_the_first_step(base, ag):
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)
    ref = base("a red circle", generator=seeded(), callback_on_step_end=cutoff, **KW).images
    out = ag("a red circle", guidance="ag", gamma_bar=-1.0, generator=seeded(), **KW)
    np.testing.assert_array_equal(out.images, ref)
    assert out.nfe == [6 + 1]


def test_guidance_scale_one_is_conditional_only(base, ag):
    kwargs = dict(KW, guidance_scale=1.0)
    ref = base("a red circle", generator=seeded(), **kwargs).images
    out = ag("a red circle", guidance="ag", generator=seeded(), **kwargs)
    np.testing.assert_array_equal(out.images, ref)
    assert out.nfe == [6]


def test_batched_equals_single_and_the_unconditional_batch_shrinks(ag):
    rows = []
    handle = ag.unet.conv_in.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    try:
        batch = ag(
            ["a red circle", "a blue star"], guidance="ag", gamma_bar=-1.0, generator=[seeded(0), seeded(1)], **KW
        )
    finally:
        handle.remove()
    assert rows == [4] + [2] * 5  # [uncond, cond] once, then cond only
    for k, prompt in enumerate(["a red circle", "a blue star"]):
        single = ag(prompt, guidance="ag", gamma_bar=-1.0, generator=seeded(k), **KW)
        np.testing.assert_allclose(batch.images[k], single.images[0], atol=1e-5)
    assert batch.nfe == [7, 7]


def test_hook_is_removed_even_when_sampling_fails(ag):
    def boom(pipe, i, t, kwargs):
        raise RuntimeError("stop")

    forward = ag.unet.forward
    with pytest.raises(RuntimeError, match="stop"):
        ag("a red circle", guidance="ag", callback_on_step_end=boom, **KW)
    assert ag.unet.forward == forward and not ag.unet._diffusers_hook.hooks


@pytest.mark.parametrize("space", ["x0", "epsilon", "v"])
def test_v_prediction_runs_in_every_space(space):
    pipe = AdaptiveGuidancePipeline(**tiny_sd_components(prediction_type="v_prediction"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", guidance="ag", guidance_space=space, gamma_bar=0.5, generator=seeded(), **KW)
    assert np.isfinite(out.images).all() and 7 <= out.nfe[0] <= 12
    assert out.gammas.shape == (6, 1)


def test_sdxl_runs_with_ag():
    pipe = AdaptiveGuidanceXLPipeline(**tiny_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(KW, height=32, width=32)
    out = pipe(["a red circle", "a blue star"], guidance="ag", gamma_bar=-1.0, generator=seeded(), **kwargs)
    assert out.images.shape == (2, 32, 32, 3) and out.nfe == [7, 7]
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pipe(pipe)("a red circle", generator=seeded(), **kwargs).images
    np.testing.assert_array_equal(pipe("a red circle", guidance="cfg", generator=seeded(), **kwargs).images, ref)


def test_linear_ag_runs_with_fitted_coefficients_and_refuses_other_settings(ag, tmp_path):
    from genreg.methods.adaptive_guidance import CalibrationRecorder

    fitter = LinearAGFitter(6, 0.5)
    ag(
        ["a red circle", "a blue star", "a green square"],
        guidance=CalibrationRecorder(fitter),
        generator=seeded(),
        **KW,
    )
    path = fitter.fit(sampling_settings(ag.scheduler, 6.0, 0.5)).save(tmp_path / "linear_ag.json")
    loaded = LinearAGCoefficients.load(path)
    assert sorted(loaded.coefficients) == [1]  # steps 0..2 are the first half: CFG at 0 and 2, regressed at 1
    out = ag("a red circle", guidance="linear_ag", linear_ag_coefficients=path, generator=seeded(), **KW)
    assert out.nfe == [2 + 1 + 2 + 1 + 1 + 1] and np.isfinite(out.images).all()
    with pytest.raises(ValueError, match="fitted for timesteps=6 steps.*sampling uses timesteps=8 steps"):
        ag("a red circle", guidance="linear_ag", linear_ag_coefficients=path, **dict(KW, num_inference_steps=8))
    with pytest.raises(ValueError, match="guidance_scale"):
        ag("a red circle", guidance="linear_ag", linear_ag_coefficients=path, **dict(KW, guidance_scale=3.0))
    with pytest.raises(ValueError, match="needs linear_ag_coefficients"):
        ag("a red circle", guidance="linear_ag", **KW)


def test_bad_policy_options(ag):
    with pytest.raises(ValueError, match="unknown guidance"):
        ag("a red circle", guidance="fast", **KW)
    with pytest.raises(ValueError, match="unknown space"):
        ag("a red circle", guidance="ag", guidance_space="latent", **KW)
    with pytest.raises(ValueError, match="min_cfg_steps"):
        ag("a red circle", guidance="ag", min_cfg_steps=-1, **KW)


def test_cli_generate_with_ag_prints_nfe(tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["generate", "a red circle on the left", "--steps", "4", "--guidance", "ag", "--gamma-bar", "-1"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "5.0 NFE per image vs 8 for CFG" in capsys.readouterr().out


def test_calibrate_returns_curves_in_every_space_and_usable_coefficients(ag):
    from genreg.methods.adaptive_guidance import calibrate

    prompts = ["a red circle", "a blue star", "a green square"]
    gammas, coefficients = calibrate(ag, prompts, num_inference_steps=6, guidance_scale=6.0, batch_size=2)
    assert set(gammas) == {"epsilon", "x0", "v"}
    for g in gammas.values():
        assert g.shape == (6, 3) and torch.isfinite(g).all() and (g <= 1 + 1e-5).all()
    coefficients.check(sampling_settings(ag.scheduler, 6.0, 0.5))
    out = ag("a red circle", guidance="linear_ag", linear_ag_coefficients=coefficients, generator=seeded(), **KW)
    assert out.nfe == [8]


def test_calibration_script_writes_curves_plot_and_coefficients(tmp_path):
    import json
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "scripts/calibrate_adaptive_guidance.py",
        "--num_prompts",
        "4",
        "--num_inference_steps",
        "4",
    ]
    cmd += ["--target_nfe", "6", "--batch_size", "4", "--output_dir", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True)
    report = json.loads((tmp_path / "gamma_curves.json").read_text())
    assert len(report["spaces"]["x0"]["curve"]["p50"]) == 4
    assert report["spaces"]["x0"]["gamma_bar_for_nfe"]["6.0"]["mean_nfe"] <= 6
    assert (tmp_path / "gamma_curves.png").stat().st_size > 0
    assert LinearAGCoefficients.load(tmp_path / "linear_ag.json").settings["timesteps"] == [999, 749, 499, 249]

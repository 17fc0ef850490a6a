"""Score Forgetting Distillation: its noise levels, losses and branches, the prompt sets, the trainer on the shared
loop (exact resume, two processes equal one) and the one-step pipeline it writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from genreg.pipelines import OneStepPipeline

from genreg.cli import main
from genreg.methods.score_forgetting import (
    SFDConfig,
    SFDObjective,
    fake_score_loss,
    generate,
    prompt_sets,
    sid_generator_loss,
    timestep_of_sigma,
    train_sfd,
)
from genreg.methods.score_forgetting import trainer as trainer_module
from genreg.testing import tiny_sd_components
from genreg.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def pipe(prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    p = StableDiffusionPipeline(**tiny_sd_components(0, prediction_type))
    p.set_progress_bar_config(disable=True)
    return p


def config(**changes) -> SFDConfig:
    return SFDConfig(**({"forget": "star", "override": "circle"} | changes))


def train(tmp_path, name: str = "out", **changes) -> TrainConfig:
    defaults = {"max_train_steps": 2, "train_batch_size": 2, "checkpointing_steps": 1, "report_to": "none"}
    return TrainConfig(output_dir=str(tmp_path / name), **(defaults | {"learning_rate": 1e-4} | changes))


def test_noise_levels_are_the_official_timesteps_in_either_schedule():
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ddpm = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert [timestep_of_sigma(sd, s) for s in (0.137, 2.5, 13.08)] == [20, 625, 980]
    assert [timestep_of_sigma(ddpm, s) for s in (0.137, 2.5, 13.08)] == [38, 440, 712]


def test_the_sid_loss_has_its_stop_gradient_normaliser():
    torch.manual_seed(0)
    real, fake, x_g = (torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(3))
    loss = sid_generator_loss(real, fake, x_g, alpha=1.0)
    omega = (real - x_g).abs().flatten(1).mean(1).view(-1, 1, 1, 1).detach()
    want = ((real - fake) * (fake - x_g) / omega).flatten(1).sum(1).mean()  # alpha 1: (f_phi - f_psi)(f_psi - x_g)
    torch.testing.assert_close(loss, want)
    grads = torch.autograd.grad(loss, (real, fake, x_g))
    torch.testing.assert_close(grads, torch.autograd.grad(want, (real, fake, x_g)))


def test_the_fake_epsilon_loss_is_the_snr_weighted_v_loss():
    p = pipe("v_prediction")
    x0, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t, cond = torch.tensor([100, 700]), torch.randn(2, 77, 32)
    a = p.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        v_error = (p.unet(x_t, t, cond).sample - p.scheduler.get_velocity(x0, noise, t)).square()
        weighted = (a * v_error).flatten(1).sum(1).mean()  # SNR / (SNR + 1) = a
        torch.testing.assert_close(fake_score_loss(p.unet, x0, noise, t, cond, p.scheduler), weighted)


def test_the_forget_branch_asks_the_teacher_for_the_override(monkeypatch):
    objective = SFDObjective(pipe(), config())
    seen = []
    real = trainer_module.x0_prediction

    def spy(unet, x_t, t, conds, scale, scheduler):
        who = "teacher" if unet is objective.teacher else "fake"
        seen.append((who, conds[1][0, 1, 0].item()))
        return real(unet, x_t, t, conds, scale, scheduler)

    monkeypatch.setattr(trainer_module, "x0_prediction", spy)
    token = {"remain": 3, "forget": 4, "override": 5}
    batch = {f"{k}_ids": torch.full((2, 77), v) for k, v in token.items()} | {"uncond_ids": torch.zeros(2, 77).long()}
    batch["seed"] = torch.tensor([1, 2])
    objective.generator_loss(batch)
    embed = {k: objective.embed(batch[f"{k}_ids"])[0, 1, 0].item() for k in token}
    assert seen == [
        ("teacher", embed["remain"]),
        ("fake", embed["remain"]),
        ("teacher", embed["override"]),
        ("fake", embed["forget"]),
    ]


def test_prompt_sets_name_the_concept_and_replace_it_and_remain_never_names_it():
    forget, override, remain = prompt_sets(config())
    assert all("star" in p for p in forget) and all("star" not in p and "circle" in p for p in override)
    assert all(o == f.replace("star", "circle") for f, o in zip(forget, override, strict=True))
    assert not any("star" in p for p in remain)
    colour, _, kept = prompt_sets(config(forget="red", override="blue"))
    assert all("red" in p for p in colour) and not any("red" in p for p in kept)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"override": "Star"}, "forget and override are the same"),
        ({"forget": " "}, "forget is empty"),
        ({"forget": "zebra"}, "is not a tiny-world value"),
        ({"sigma_init": 20.0}, "noise levels must be"),
        ({"forget_prompts": "missing.txt"}, "does not exist"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, changes, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_sfd(pipe(), config(**changes), train(tmp_path))
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_text_encoder_and_prompts_without_the_concept_are_refused(tmp_path):
    headless = pipe()
    headless.text_encoder = None
    with pytest.raises(ValueError, match="needs a text-conditioned model"):
        train_sfd(headless, config(), train(tmp_path))
    prompts = tmp_path / "forget.txt"
    prompts.write_text("a red star\na blue square\n")
    with pytest.raises(ValueError, match="1 forget prompts do not name 'star'"):
        train_sfd(pipe(), config(forget_prompts=str(prompts)), train(tmp_path))
    assert not (tmp_path / "out").exists()


def test_training_writes_a_one_step_pipeline_that_reproduces_the_generator(tmp_path):
    p = pipe()
    teacher = {k: v.clone() for k, v in p.unet.state_dict().items()}
    out = train_sfd(p, config(), train(tmp_path))
    assert all(torch.equal(v, teacher[k]) for k, v in p.unet.state_dict().items())  # the teacher is untouched
    one = OneStepPipeline.from_pretrained(out)
    one.set_progress_bar_config(disable=True)
    assert one.config.t_init == timestep_of_sigma(p.scheduler, 2.5)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = one("a red circle", latents=z, output_type="latent").images
    cond = one.encode_prompt("a red circle", "cpu", 1, False)[0]
    with torch.no_grad():
        torch.testing.assert_close(latents, generate(one.unet, z, cond, one.config.t_init, one.scheduler))
    assert not torch.equal(one.unet.state_dict()["conv_in.weight"], teacher["conv_in.weight"])  # it trained
    for bad in ({"guidance_scale": 5.0}, {"num_inference_steps": 25}, {"guidance": "ag"}):
        with pytest.raises(ValueError, match="one-step generator"):
            one("a red circle", **bad)


def test_a_run_can_start_from_an_earlier_runs_generator(tmp_path):
    sid = train_sfd(pipe(), config(forget_weight=0.0), train(tmp_path, "sid", max_train_steps=1))
    saved = OneStepPipeline.from_pretrained(sid).unet.state_dict()
    objective = SFDObjective(pipe(), config(generator_init=str(sid)))
    assert all(torch.equal(v, saved[k]) for k, v in objective.generator.state_dict().items())
    teacher = pipe().unet.state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in objective.fake.state_dict().items())  # psi: the teacher's


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"generator_init": "teacher"}, "is not a one-step generator"),
        ({"sigma_init": 3.0}, "was distilled at t_init"),
    ],
)
def test_a_generator_to_start_from_is_checked_before_any_work(tmp_path, changes, message):
    sid = train_sfd(pipe(), config(forget_weight=0.0), train(tmp_path, "sid", max_train_steps=1))
    changes = {"generator_init": str(sid)} | changes
    if changes["generator_init"] == "teacher":
        changes["generator_init"] = str(tmp_path / "teacher")
        pipe().save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=message):
        train_sfd(pipe(), config(**changes), train(tmp_path))
    assert not (tmp_path / "out").exists()


def test_a_generator_of_another_architecture_than_the_teacher_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    sid = train_sfd(pipe(), config(forget_weight=0.0), train(tmp_path, "sid", max_train_steps=1))
    deeper = pipe()
    deeper.unet = UNet2DConditionModel.from_config({**deeper.unet.config, "layers_per_block": 2})
    with pytest.raises(ValueError, match="holds another architecture than the teacher's UNet"):
        train_sfd(deeper, config(generator_init=str(sid)), train(tmp_path))
    assert not (tmp_path / "out").exists()


def test_resume_equals_the_uninterrupted_run(tmp_path):
    full = OneStepPipeline.from_pretrained(train_sfd(pipe(), config(), train(tmp_path, "full", max_train_steps=3)))
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] == 2

    train_sfd(pipe(), config(), train(tmp_path, "split", max_train_steps=3), should_stop=stop_after_two)
    resumed = train_sfd(pipe(), config(), train(tmp_path, "split", max_train_steps=3, resume_from_checkpoint="latest"))
    a, b = full.unet.state_dict(), OneStepPipeline.from_pretrained(resumed).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_genreg_train_sfd_refuses_bad_concepts_and_writes_nothing(tmp_path, capsys):
    model = tmp_path / "model"
    pipe().save_pretrained(model)
    argv = ["train", "sfd", "--pretrained_model_name_or_path", str(model), "--output_dir", str(tmp_path / "o")]
    assert main([*argv, "--forget", "star", "--override", "star"]) == 2
    assert "forget and override are the same" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_cpu_processes_reach_the_single_process_generator(tmp_path):
    """2 processes x batch 1 == 1 process x batch 2: same samples, gradients of both networks averaged by hand."""
    model = tmp_path / "model"
    pipe().save_pretrained(model)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    script = str(ROOT / "scripts" / "train_sfd.py")
    common = ["--pretrained_model_name_or_path", str(model), "--forget", "star", "--override", "circle"]
    common += ["--max_train_steps", "2", "--report_to", "none", "--learning_rate", "1e-4", "--adam_epsilon", "1e-2"]
    one = [*common, "--train_batch_size", "2", "--output_dir", str(tmp_path / "one")]
    two = [*common, "--train_batch_size", "1", "--output_dir", str(tmp_path / "two")]
    subprocess.run([sys.executable, script, *one], check=True, env=env, capture_output=True)
    torchrun = ["torchrun", "--nproc_per_node", "2", "--master_port", "29575", script, *two]
    subprocess.run(torchrun, check=True, env=env, capture_output=True)
    a = OneStepPipeline.from_pretrained(tmp_path / "one" / "generator").unet.state_dict()
    b = OneStepPipeline.from_pretrained(tmp_path / "two" / "generator").unet.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)


def test_the_benchmark_refuses_a_two_stage_row_listed_before_sid(tmp_path):
    cmd = [sys.executable, "scripts/bench_sfd.py", "--rows", "sfd-two-stage", "sid", "--work_dir", str(tmp_path / "w")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "list sid before it" in run.stderr
    assert not (tmp_path / "w").exists()

"""The bundled model's training script: end to end at toy sizes (slow: run with -m slow), and its argument checks."""

import subprocess
import sys

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_train_script_writes_a_loadable_pipeline_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    out, work = tmp_path / "model", tmp_path / "work"
    cmd = [sys.executable, "scripts/train_tinyworld.py", "--work_dir", str(work), "--output_dir", str(out)]
    cmd += ["--evaluator_out", str(tmp_path / "evaluator.safetensors"), "--base_pool", "256", "--full_pool", "256"]
    cmd += ["--test_pool", "64", "--evaluator_steps", "5", "--vae_steps", "5", "--eval_every", "4"]
    cmd += ["--eval_prompts", "4", "--checkpointing_steps", "2", "--processes", "1", "--batch_size", "8"]
    cmd += ["--shapes_batch_size", "4"]  # the first phase's own batch size
    cmd += ["--layout_from_step", "3", "--evaluator_reconstructions", "100"]  # both phases; part of the pool decoded
    subprocess.run([*cmd, "--unet_steps", "4"], check=True, capture_output=True)
    # Resume from the step-4 checkpoint and go on to step 6.
    subprocess.run([*cmd, "--unet_steps", "6"], check=True, capture_output=True)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert image.images.shape == (1, 64, 64, 3) and np.isfinite(image.images).all()
    assert (tmp_path / "evaluator.safetensors").is_file()
    assert '"step": 6' in (work / "denoiser_checkpoint" / "state.json").read_text()


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--evaluator_reconstructions", "-1"], "--evaluator_reconstructions counts images"),
        (["--shapes_batch_size", "0"], "batch sizes are 1 or more"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, bad, message):
    cmd = [sys.executable, "scripts/train_tinyworld.py", "--work_dir", str(tmp_path / "work")]
    run = subprocess.run([*cmd, *bad], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr
    assert not (tmp_path / "work").exists()

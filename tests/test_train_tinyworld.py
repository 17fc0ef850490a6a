"""The bundled model's training script: end to end at toy sizes (slow: run with -m slow), and its argument checks."""

import random
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel


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
    cmd += ["--latent_norm", "channel"]
    subprocess.run([*cmd, "--unet_steps", "4"], check=True, capture_output=True)
    first_unet = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    # A run that finds the data, VAE and evaluator already made trains the same denoiser as one that made them.
    work2 = tmp_path / "work2"
    shutil.copytree(work, work2, ignore=shutil.ignore_patterns("denoiser_checkpoint", "best_ema.safetensors"))
    again = [*cmd, "--unet_steps", "4", "--work_dir", str(work2), "--output_dir", str(tmp_path / "model2")]
    subprocess.run(again, check=True, capture_output=True)
    assert (tmp_path / "model2" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == first_unet
    # Resume from the step-4 checkpoint and go on to step 6.
    subprocess.run([*cmd, "--unet_steps", "6"], check=True, capture_output=True)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert image.images.shape == (1, 64, 64, 3) and np.isfinite(image.images).all()
    assert (tmp_path / "evaluator.safetensors").is_file()
    assert '"step": 6' in (work / "denoiser_checkpoint" / "state.json").read_text()
    assert pipe.vae.config.scaling_factor == 1.0  # the channels' spread is folded into the VAE
    # Resuming in another latent space would continue the UNet on latents it was not trained on: refused.
    run = subprocess.run([*cmd, "--unet_steps", "8", "--latent_norm", "global"], capture_output=True, text=True)
    assert run.returncode != 0 and "pass the same flags to resume" in run.stderr


def test_the_unet_layout_places_transformer_blocks_and_heads_per_level():
    from genreg.tinyworld import model_path
    from genreg.tinyworld.architecture import build_unet

    unet = build_unet()  # Tiny World 2: transformer blocks at every level, 16x16 included as SD 1.x places them
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 3
    top = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert top.heads == 1 and top.inner_dim == 32
    assert unet.down_blocks[2].attentions[0].transformer_blocks[0].attn1.heads == 4
    sd_like = build_unet((32, 64, 96), (True, True, False), heads=2)  # convolutional lowest level, as SD 1.x
    assert sd_like.config.down_block_types[-1] == "DownBlock2D" and sd_like.config.up_block_types[0] == "UpBlock2D"
    assert sd_like.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 2
    first = build_unet((32, 64, 128), (False, True, True), heads=4)  # Tiny World 1's layout
    assert first.config.down_block_types[0] == "DownBlock2D" and first.config.up_block_types[-1] == "UpBlock2D"
    bundled = UNet2DConditionModel.from_pretrained(model_path(), subfolder="unet")  # the default layout, trained
    keys = ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim")
    assert [list(unet.config[k]) for k in keys] == [list(bundled.config[k]) for k in keys]
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in bundled.parameters())
    with pytest.raises(ValueError, match="one attention flag and head count per level"):
        build_unet(widths=(32, 64), attention=(True, True, True))


def test_zero_residual_outputs_start_every_block_as_the_identity_and_still_train():
    from genreg.tinyworld.architecture import build_unet, zero_residual_outputs

    torch.manual_seed(0)
    unet = build_unet()
    untouched = {k: v.clone() for k, v in unet.state_dict().items()}
    zero_residual_outputs(unet)
    zeroed = {k for k, v in unet.state_dict().items() if not torch.equal(v, untouched[k])}
    assert zeroed and all(k.startswith("conv_out.") or ".conv2." in k or ".proj_out." in k for k in zeroed)
    assert any(".attentions.0.proj_out.weight" in k for k in zeroed)  # the transformer blocks' outputs too
    x, t, cond = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 32, 64)
    assert unet(x, t, cond).sample.abs().max() == 0
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    for _ in range(2):  # the first step moves conv_out only; from the second on, every block learns
        opt.zero_grad()
        unet(x, t, cond).sample.sub(x).pow(2).mean().backward()
        opt.step()
    moved = unet.down_blocks[0].attentions[0].proj_out.weight
    assert moved.abs().max() > 0


def test_x0_error_by_band_is_zero_for_an_exact_denoiser():
    sys.path.insert(0, "scripts")
    from train_tinyworld import X0_BANDS, x0_error_by_band

    from genreg.tinyworld.architecture import build_scheduler, build_text_encoder, build_tokenizer
    from genreg.tinyworld.world import sample_scene

    scheduler = build_scheduler("v_prediction")
    alphas = scheduler.alphas_cumprod

    def exact(x_t, t, cond):  # for clean latents of zero, x_t = sqrt(1 - a) eps and v = sqrt(a) eps
        a = alphas[t].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=a.sqrt() * x_t / (1 - a).sqrt())

    tokenizer = build_tokenizer()
    pipe = SimpleNamespace(
        vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0)),
        scheduler=scheduler,
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(len(tokenizer)),
        unet=exact,
        device=torch.device("cpu"),
    )
    scenes = [sample_scene(random.Random(i)) for i in range(8)]
    errors = x0_error_by_band(pipe, torch.zeros(8, 4, 16, 16), scenes, n=8)
    assert set(errors) == {"prompt", "empty"} and len(errors["empty"]) == len(X0_BANDS)
    assert max(errors["prompt"] + errors["empty"]) < 1e-6
    pipe.unet = lambda x_t, t, cond: SimpleNamespace(sample=torch.zeros_like(x_t))  # v = 0 means x0 = sqrt(a) x_t
    assert min(x0_error_by_band(pipe, torch.zeros(8, 4, 16, 16), scenes, n=8)["empty"]) > 0


def test_standardised_latent_channels_are_the_same_autoencoder():
    from genreg.tinyworld.architecture import build_vae, standardize_latent_channels

    torch.manual_seed(0)
    vae = build_vae().eval()
    x = torch.rand(6, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        decoded = vae.decode(before.mean).sample
        mean, std = before.mean.mean(dim=(0, 2, 3)), before.mean.std(dim=(0, 2, 3))
        standardize_latent_channels(vae, mean, std)
        after = vae.encode(x).latent_dist
        expected = (before.mean - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        torch.testing.assert_close(after.mean, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(after.std, before.std / std.view(1, -1, 1, 1), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(vae.decode(after.mean).sample, decoded, atol=1e-5, rtol=1e-4)
    assert torch.allclose(after.mean.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--evaluator_reconstructions", "-1"], "--evaluator_reconstructions counts images"),
        (["--shapes_batch_size", "0"], "batch sizes are 1 or more"),
        (["--unet_widths", "32,64", "--unet_attention", "1,1,1"], "one value per level each"),
        (["--focus", "small teal"], "not teal"),
        (["--focus_weight", "0"], "--focus_weight is a sampling weight"),
        (["--init_model", "no/such/model"], "is not a diffusers model folder"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, bad, message):
    cmd = [sys.executable, "scripts/train_tinyworld.py", "--work_dir", str(tmp_path / "work")]
    run = subprocess.run([*cmd, *bad], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr
    assert not (tmp_path / "work").exists()


def test_focus_weights_draw_the_scenes_holding_a_focus_object_more_often():
    sys.path.insert(0, "scripts")
    from train_tinyworld import focus_weights

    from genreg.tinyworld.world import Obj, Scene

    scenes = [
        Scene((Obj("circle", "orange", "small", "left"),)),
        Scene((Obj("circle", "orange", "large", "left"),)),  # large: not a focus
        Scene((Obj("star", "blue", "large", "top"), Obj("square", "yellow", "small", "bottom"))),  # either object
        Scene((Obj("star", "blue", "small", "top"),)),
    ]
    weights = focus_weights(scenes, ["small orange", "small yellow"], 3.0)
    assert weights.tolist() == [3.0, 1.0, 3.0, 1.0]
    assert focus_weights(scenes, [], 3.0).tolist() == [1.0] * 4

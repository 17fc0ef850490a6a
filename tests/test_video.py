"""The Tiny World's clips, the per-frame video evaluator, and text-to-video on stock AnimateDiff (genreg.video)."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from genreg.tinyworld import render, sample_scene
from genreg.tinyworld.render import placement
from genreg.tinyworld.video import (
    MOTIONS,
    NUM_FRAMES,
    TRACK,
    Clip,
    clip_caption,
    clip_prompt,
    frame_placements,
    parse_motion,
    render_clip,
    sample_clip,
)
from genreg.tinyworld.video_eval import VideoEvaluator, components, frames_tensor
from genreg.tinyworld.world import Obj, Scene


@pytest.fixture(scope="module")
def evaluator() -> VideoEvaluator:
    return VideoEvaluator.load()


def clips(n: int, seed: int = 3) -> list[Clip]:
    rng = random.Random(seed)
    return [sample_clip(rng, motion=MOTIONS[i % len(MOTIONS)]) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# the world


def test_placements_default_to_the_still_scene_and_must_match_its_objects():
    scene = sample_scene(random.Random(4), 2)
    still = np.asarray(render(scene)[0])
    placed = np.asarray(render(scene, placements=[placement(o) for o in scene.objects])[0])
    assert np.array_equal(still, placed)
    with pytest.raises(ValueError, match="2 placements for a scene of 1"):
        render(Scene((scene.objects[0],)), placements=[placement(o) for o in scene.objects])


def test_a_translation_runs_the_track_and_other_motions_stay_in_place():
    red_circle = Obj("circle", "red", "large", "center")
    right = frame_placements(Clip(Scene((red_circle,)), "right"))
    assert len(right) == NUM_FRAMES
    assert (right[0][0].cx, right[-1][0].cx) == TRACK and all(f[0].cy == 32 for f in right)
    pair = Scene((Obj("star", "blue", "small", "left"), Obj("square", "green", "large", "right")))
    up = frame_placements(Clip(pair, "up"))
    assert [f[0].cy for f in (up[0], up[-1])] == [TRACK[1], TRACK[0]] and {f[1].cx for f in up} == {49}
    grow = frame_placements(Clip(Scene((Obj("star", "blue", "small", "left"),)), "growing"))
    assert grow[0][0].radius < grow[-1][0].radius and {(f[0].cx, f[0].cy) for f in grow} == {(15, 32)}
    turn = frame_placements(Clip(Scene((red_circle,)), "turning", "blue"))
    assert turn[0][0].rgb == placement(red_circle).rgb and turn[-1][0].rgb == (40, 80, 220)


def test_clips_are_deterministic_uint8_frames():
    a, b = render_clip(clips(1, seed=9)[0]), render_clip(clips(1, seed=9)[0])
    assert a.shape == (NUM_FRAMES, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert render_clip(clips(1)[0], num_frames=5).shape[0] == 5


def test_bad_clips_are_refused_with_the_fix():
    scene = Scene((Obj("circle", "red", "large", "center"),))
    with pytest.raises(ValueError, match="unknown motion 'spinning'"):
        Clip(scene, "spinning")
    with pytest.raises(ValueError, match="names the colour it turns to"):
        Clip(scene, "turning")
    with pytest.raises(ValueError, match="names the colour it turns to"):
        Clip(scene, "right", "blue")


def test_captions_name_the_motion_and_parse_back():
    rng = random.Random(0)
    for clip in clips(60):
        for text in (clip_prompt(clip), clip_caption(clip, rng)):
            motion, to_color, rest = parse_motion(text)
            assert (motion, to_color) == (clip.motion, clip.to_color), text
            assert "moving" not in rest and "turning" not in rest
    with pytest.raises(ValueError, match="names no motion; say one of: moving to the right"):
        parse_motion("a red circle on the left")


def test_motion_words_are_single_tokens_appended_after_every_earlier_id():
    from genreg.tinyworld.architecture import build_tokenizer

    tok = build_tokenizer()
    ids = tok("a red circle moving to the right", add_special_tokens=False).input_ids
    assert len(ids) == 7 and max(ids) < len(tok)


# ---------------------------------------------------------------------------------------------------------------------
# the per-frame evaluator


def test_rendered_clips_score_at_the_ceiling(evaluator):
    sample = clips(18)
    scores = evaluator.score([render_clip(c) for c in sample], [clip_prompt(c) for c in sample])
    assert scores["motion_followed"] == 1.0 and scores["smooth"] == 1.0
    assert scores["identity"] >= 0.94 and scores["adherence"] >= 0.97


def test_wrong_motion_still_frames_and_jumps_are_caught(evaluator):
    clip = Clip(Scene((Obj("square", "green", "large", "center"),)), "right")
    frames = render_clip(clip)
    assert evaluator.score_clip(frames, clip_prompt(clip))["motion_followed"] == 1.0
    assert evaluator.score_clip(frames, "a large green square moving to the left")["motion_followed"] == 0.0
    assert evaluator.score_clip(frames[::-1], clip_prompt(clip))["motion_followed"] == 0.0
    still = np.repeat(frames[:1], NUM_FRAMES, axis=0)
    assert evaluator.score_clip(still, clip_prompt(clip))["motion_followed"] == 0.0
    jumpy = frames[[0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]]
    result = evaluator.score_clip(jumpy, clip_prompt(clip))
    assert result["jumps"] == 2 and result["step_px"] > 2.3
    assert evaluator.score_clip(frames, "a large red square moving to the right")["adherence"] == 0.0


def test_identity_breaks_when_the_object_changes(evaluator):
    circle = render_clip(Clip(Scene((Obj("circle", "red", "large", "center"),)), "right"))
    star = render_clip(Clip(Scene((Obj("star", "red", "large", "center"),)), "right"))
    mixed = np.concatenate([circle[:8], star[8:]])
    assert evaluator.score_clip(circle, "a large red circle moving to the right")["identity"] == 1.0
    result = evaluator.score_clip(mixed, "a large red circle moving to the right")
    assert result["identity"] == 0.0 and result["similarity"] < 0.95


def test_two_objects_are_tracked_in_their_lanes(evaluator):
    pair = Scene((Obj("circle", "red", "large", "top"), Obj("square", "blue", "small", "bottom")))
    frames = render_clip(Clip(pair, "left"))
    good = evaluator.score_clip(
        frames, "a large red circle at the top and a small blue square at the bottom moving to the left"
    )
    assert good["motion_followed"] == good["identity"] == good["adherence"] == 1.0
    swapped = "a large red circle at the bottom and a small blue square at the top moving to the left"
    assert evaluator.score_clip(frames, swapped)["adherence"] == 0.0


def test_components_split_separate_objects():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    mask[0, 5:7, 4:8] = True
    labels = components(mask)
    assert len(labels.unique()) == 3 and (labels[0, 1:3, 1:3] == labels[0, 1, 1]).all()


def test_frames_are_taken_as_uint8_or_float_and_bad_shapes_are_refused():
    frames = render_clip(clips(1)[0])
    assert torch.allclose(frames_tensor(frames), frames_tensor(frames.astype(np.float32) / 255))
    with pytest.raises(ValueError, match=r"a stack of frames \(F, H, W, 3\)"):
        frames_tensor(frames[0])


def test_frechet_distance_is_zero_to_itself_and_grows_with_difference(evaluator):
    sample = clips(12)
    truth = [render_clip(c) for c in sample]
    assert abs(evaluator.frechet(truth, truth)) < 1e-6
    assert evaluator.frechet([np.repeat(t[:1], NUM_FRAMES, axis=0) for t in truth], truth) > 0.01


# ---------------------------------------------------------------------------------------------------------------------
# genreg.video on tiny random components


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from genreg.testing import tiny_motion_adapter, tiny_sd_components

    folder = tmp_path_factory.mktemp("adapter")
    tiny_motion_adapter().save_pretrained(folder)
    return StableDiffusionPipeline(**tiny_sd_components()), folder


def test_with_motion_gives_stock_animatediff_and_refuses_a_mismatched_adapter(tiny_video, tmp_path):
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from genreg.video import generate_video, with_motion

    base, folder = tiny_video
    pipe = with_motion(base, folder)
    assert type(pipe) is AnimateDiffPipeline and pipe.text_encoder is base.text_encoder
    kwargs = {"num_inference_steps": 2, "output_type": "np", "height": 32, "width": 32}
    out = generate_video(
        pipe, "a red circle moving to the right", num_frames=4, generator=torch.Generator().manual_seed(0), **kwargs
    )
    again = generate_video(
        pipe, "a red circle moving to the right", num_frames=4, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert out.frames.shape == (1, 4, 32, 32, 3) and np.array_equal(out.frames, again.frames)
    wide = MotionAdapter(
        block_out_channels=(8, 32), motion_layers_per_block=1, motion_num_attention_heads=2, motion_norm_num_groups=4
    )
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"made for a UNet of widths \(8, 32\), but this model's are \(8, 16\)"):
        with_motion(base, tmp_path / "wide")
    with pytest.raises(FileNotFoundError, match="no motion adapter in"):
        with_motion(base, tmp_path / "nothing")


def test_a_domain_adapter_trains_beside_the_motion_modules_and_loads_with_its_adapter(tiny_video, tmp_path):
    import shutil

    from diffusers import AnimateDiffPipeline, MotionAdapter, UNetMotionModel
    from peft.utils import get_peft_model_state_dict

    from genreg.video import add_domain_adapter, with_motion

    base, folder = tiny_video
    unet = UNetMotionModel.from_unet2d(base.unet, MotionAdapter.from_pretrained(folder))
    add_domain_adapter(unet, 2)
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in unet.named_parameters() if "motion_modules" in n or "lora_" in n}
    assert all("motion_modules" not in n for n in trained if "lora_" in n)  # LoRA on the image layers only
    with torch.no_grad():  # a trained domain adapter (LoRA B starts at zero)
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    shutil.copytree(folder, tmp_path / "adapter")
    layers = get_peft_model_state_dict(unet)
    AnimateDiffPipeline.save_lora_weights(tmp_path / "adapter", unet_lora_layers=layers, safe_serialization=True)

    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    kwargs = {"num_frames": 4, "num_inference_steps": 2, "output_type": "np", "height": 32, "width": 32}
    prompt = "a red circle moving to the right"
    plain = with_motion(base, folder)(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe = with_motion(base, tmp_path / "adapter")
    assert pipe.get_active_adapters() == ["domain"]
    domain = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert np.abs(domain - plain).max() > 1e-3
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in before.items())  # the image model untouched


def test_long_videos_use_freenoise_only_for_that_call(tiny_video):
    from genreg.video import clip_length, generate_video, with_motion

    base, folder = tiny_video
    pipe = with_motion(base, folder)
    assert clip_length(pipe) == 16
    kwargs = {"num_inference_steps": 1, "output_type": "np", "height": 32, "width": 32}
    out = generate_video(
        pipe, "a red circle moving up", num_frames=24, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert out.frames.shape[1] == 24 and not pipe.free_noise_enabled


def test_save_video_writes_gif_and_mp4_atomically_and_refuses_other_names(tmp_path):
    import imageio_ffmpeg

    from genreg.video import save_video

    frames = render_clip(clips(1)[0])
    gif = save_video(frames, tmp_path / "clip.gif", fps=8)
    with Image.open(gif) as im:
        assert im.n_frames == NUM_FRAMES
    mp4 = save_video(list(frames.astype(np.float32) / 255), tmp_path / "clip.mp4", scale=2)
    reader = imageio_ffmpeg.read_frames(str(mp4))
    meta = next(reader)
    assert meta["size"] == (128, 128) and sum(1 for _ in reader) == NUM_FRAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.mp4"]
    with pytest.raises(ValueError, match="end it in .gif or .mp4"):
        save_video(frames, tmp_path / "clip.png")


# ---------------------------------------------------------------------------------------------------------------------
# the bundled text-to-video model


def test_bundled_video_model_loads_with_stock_diffusers_and_knows_the_motion_words(evaluator):
    from diffusers import AnimateDiffPipeline, MotionAdapter
    from transformers import CLIPTokenizer

    from genreg.tinyworld import model_path, motion_adapter_path

    adapter = MotionAdapter.from_pretrained(motion_adapter_path())
    pipe = AnimateDiffPipeline.from_pretrained(model_path(), motion_adapter=adapter)
    pipe.load_lora_weights(motion_adapter_path(), adapter_name="domain")  # its domain adapter, the stock way
    assert pipe.get_active_adapters() == ["domain"]
    pipe.set_progress_bar_config(disable=True)
    tokenizer = CLIPTokenizer.from_pretrained(model_path() / "tokenizer")
    assert len(tokenizer("moving to the right growing turning up down", add_special_tokens=False).input_ids) == 8
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == len(tokenizer)
    frames = pipe(
        "a large red circle moving to the right",
        num_frames=16,
        num_inference_steps=10,
        guidance_scale=5.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames[0]
    assert frames.shape == (16, 64, 64, 3)
    objects = evaluator.objects(frames)
    assert sum(len(o) > 0 for o in objects) >= 12  # frames of the world: an object drawn on a plain background


def test_generate_video_command_writes_a_clip(tmp_path):
    out = tmp_path / "clip.gif"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "genreg.cli",
            "generate-video",
            "a small blue square moving up",
            "--num-frames",
            "16",
            "--num-inference-steps",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} (16 frames at 8 fps)" in done.stdout
    with Image.open(out) as im:
        assert im.n_frames == 16
    bad = subprocess.run(
        [sys.executable, "-m", "genreg.cli", "generate-video", "a circle", "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "end it in .gif or .mp4" in bad.stderr


def test_generate_video_command_makes_a_multi_prompt_video_with_cono(tmp_path):
    out = tmp_path / "pingpong.gif"
    prompts = ["a red circle moving to the right", "a red circle moving to the left"]
    base = [sys.executable, "-m", "genreg.cli", "generate-video", *prompts, "--num-inference-steps", "2"]
    done = subprocess.run(
        [*base, "--method", "cono", "--num-frames", "36", "--look_back", "0.5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} (36 frames at 8 fps, CoNo: " in done.stdout
    with Image.open(out) as im:
        assert im.n_frames == 36
    plain = subprocess.run([*base, "--out", str(tmp_path / "x.gif")], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "add --method cono" in plain.stderr
    short = subprocess.run(  # refused before the model is looked for
        [*base, "--method", "cono", "--num-frames", "20", "--model", "nowhere", "--out", str(tmp_path / "x.gif")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert short.returncode == 2 and "2 prompts need at least 36 frames" in short.stderr


def test_video_training_refuses_to_drop_an_adapters_domain_adapter(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    args = ["--work_dir", str(tmp_path / "work"), "--init_adapter", str(tmp_path / "adapter")]
    done = subprocess.run(
        [sys.executable, "scripts/train_tinyworld_video.py", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1 and "pass its --domain_lora_rank" in done.stderr
    assert not (tmp_path / "work").exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.parametrize("domain", [[], ["--domain_lora_rank", "2"]], ids=["motion", "with-domain-adapter"])
def test_video_training_resumes_exactly(tmp_path, domain):
    """Two steps straight, and one step then a resumed one, leave the same weights, EMA and optimizer state."""
    from safetensors.torch import load_file

    def train(work, steps):
        args = ["--work_dir", str(work), "--clips", "4", "--max_train_steps", str(steps), "--checkpointing_steps", "1"]
        args += ["--eval_clips", "1", "--output_dir", str(work / "adapter"), "--model_output_dir", str(work / "model")]
        args += domain
        done = subprocess.run(
            [sys.executable, "scripts/train_tinyworld_video.py", *args], capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr[-2000:]

    train(tmp_path / "straight", 2)
    train(tmp_path / "resumed", 1)
    train(tmp_path / "resumed", 2)
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "straight" / "checkpoint-2" / name))
        b = load_file(str(tmp_path / "resumed" / "checkpoint-2" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    trained = load_file(str(tmp_path / "straight" / "checkpoint-2" / "trainable.safetensors"))
    assert any("lora_" in k for k in trained) == bool(domain)  # the domain adapter is in the checkpoint

"""The shared embedding trainer and its methods (textual inversion, Cross Initialization) on tiny components."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genreg.diffusion import encode_latents, noise_and_timesteps
from genreg.embeddings import (
    EMBEDS_FILE,
    INIT_FILE,
    EmbeddingObjective,
    PlaceholderVectors,
    add_placeholder,
    encoder_outputs,
    load_learned_embeds,
)
from genreg.methods.cross_init import CrossInitConfig, init_distance, mean_token_rows, train_cross_init
from genreg.methods.textual_inversion import TextualInversionConfig, train_textual_inversion
from genreg.sd import diffusion_target
from genreg.testing import tiny_sd_pipeline as tiny_pipe
from genreg.training import ImageFolder, TrainConfig, list_checkpoints, resolve_checkpoint, sample_rng
from genreg.training import checkpoints as checkpoints_module


@pytest.fixture
def data_dir(tmp_path):
    """Three images of mixed sizes and modes, with captions in metadata.jsonl."""
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (48, 32), (220, 40, 40)).save(root / "a.png")
    Image.new("L", (32, 40), 90).save(root / "b.png")
    Image.new("RGBA", (64, 64), (40, 80, 220, 128)).save(root / "c.png")
    rows = [{"file_name": n, "text": f"a {{}} number {i}"} for i, n in enumerate(("a.png", "b.png", "c.png"))]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def train_config(tmp_path, name: str = "out", **kwargs) -> TrainConfig:
    defaults = {"max_train_steps": 6, "train_batch_size": 2, "checkpointing_steps": 2, "report_to": "none"}
    return TrainConfig(output_dir=str(tmp_path / name), **(defaults | kwargs))


def ci_config(data_dir, **kwargs) -> CrossInitConfig:
    defaults = {"placeholder_token": "<s>", "reference_words": ["red circle"]}
    return CrossInitConfig(train_data_dir=str(data_dir), **(defaults | kwargs))


def test_only_placeholder_rows_change_and_standard_loader_reproduces(tmp_path, data_dir):
    pipe = tiny_pipe()
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    frozen = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    path = train_cross_init(pipe, ci_config(data_dir), train_config(tmp_path))
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[: len(table)], table)  # every original row, bit for bit
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in frozen.items())
    token, vectors = load_learned_embeds(path)
    _, init = load_learned_embeds(tmp_path / "out" / INIT_FILE)
    assert token == "<s>" and vectors.shape == (2, 32) and not torch.equal(vectors, init)
    assert torch.equal(after[len(table) :], vectors)

    fresh = tiny_pipe()
    fresh.load_textual_inversion(str(tmp_path / "out"))  # plain diffusers, as a user would
    kwargs = {"num_inference_steps": 3, "output_type": "np"}
    a = pipe("a <s>", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = fresh("a <s>", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.array_equal(a, b)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, data_dir):
    whole = train_cross_init(tiny_pipe(), ci_config(data_dir), train_config(tmp_path, "whole"))

    calls = iter(range(100))
    interrupted = train_config(tmp_path, "split")
    train_cross_init(tiny_pipe(), ci_config(data_dir), interrupted, should_stop=lambda: next(calls) == 2)
    assert [p.name for p in list_checkpoints(interrupted.output_dir)] == ["checkpoint-2", "checkpoint-3"]
    resumed = train_config(tmp_path, "split", resume_from_checkpoint="latest")
    split = train_cross_init(tiny_pipe(), ci_config(data_dir), resumed)
    assert torch.equal(load_learned_embeds(whole)[1], load_learned_embeds(split)[1])


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, data_dir, monkeypatch):
    real_save = checkpoints_module.save_file
    calls = {"n": 0}

    def failing_save(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the first file of the second checkpoint
            raise OSError("disk full")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints_module, "save_file", failing_save)
    config = train_config(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        train_cross_init(tiny_pipe(), ci_config(data_dir), config)
    latest = resolve_checkpoint("latest", config.output_dir)
    assert latest.name == "checkpoint-2"
    assert load_learned_embeds(latest / EMBEDS_FILE)[1].shape == (2, 32)
    assert not (tmp_path / "out" / "checkpoint-4").exists()


def test_checkpoints_total_limit(tmp_path, data_dir):
    config = train_config(tmp_path, checkpoints_total_limit=2)
    train_textual_inversion(
        tiny_pipe(), TextualInversionConfig(train_data_dir=str(data_dir), initializer_token="red"), config
    )
    assert [p.name for p in list_checkpoints(config.output_dir)] == ["checkpoint-4", "checkpoint-6"]


def test_textual_inversion_starts_from_the_initializer_and_learns(tmp_path, data_dir):
    pipe = tiny_pipe(prediction_type="v_prediction")
    red = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("red", add_special_tokens=False).input_ids[0]]
    config = TextualInversionConfig(train_data_dir=str(data_dir), initializer_token="red", num_vectors=3)
    path = train_textual_inversion(pipe, config, train_config(tmp_path, learning_rate=1e-2))
    _, init = load_learned_embeds(tmp_path / "out" / INIT_FILE)
    assert torch.equal(init, red.detach().expand(3, -1))
    assert load_learned_embeds(path)[1].shape == (3, 32)


def test_cross_init_is_the_encoder_output_of_the_mean_reference_rows():
    pipe = tiny_pipe()
    words = ["red circle", "blue square", "green star"]
    rows = mean_token_rows(pipe.text_encoder, pipe.tokenizer, words, 2)
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = [pipe.tokenizer(w, add_special_tokens=False).input_ids for w in words]
    assert torch.allclose(rows[0], table[[i[0] for i in ids]].mean(0))
    assert torch.allclose(rows[1], table[[i[1] for i in ids]].mean(0))

    placeholder_ids = add_placeholder(pipe.tokenizer, pipe.text_encoder, "<s>", 2)
    table = pipe.text_encoder.get_input_embeddings().weight
    placeholder = PlaceholderVectors(pipe.text_encoder, placeholder_ids, table[placeholder_ids])
    got = encoder_outputs(pipe.text_encoder, pipe.tokenizer, placeholder, rows)
    placeholder.write_and_detach(pipe.text_encoder)
    with torch.no_grad():  # the same, by writing the rows into the table itself
        table[placeholder_ids] = rows
        ids = pipe.tokenizer("<s> <s>_1", padding="max_length", max_length=77, return_tensors="pt").input_ids
        want = pipe.text_encoder(ids)[0][0, 1:3]
    assert torch.allclose(got, want, atol=1e-6)


def test_tinyworld_reference_words_per_shape_class(data_dir):
    every = ci_config(data_dir, reference_words=None, subject_class="tinyworld").words()
    stars = ci_config(data_dir, reference_words=None, subject_class="tinyworld:star").words()
    assert "red star" in stars and "red circle" in every and "red circle" not in stars
    assert set(stars) < set(every) and {w.split()[1] for w in stars} == {"star"}
    assert "cyan star" not in stars  # held-out colours stay out, as in every base-world name
    with pytest.raises(ValueError, match="tiny-world shape 'planet' unknown"):
        ci_config(data_dir, subject_class="tinyworld:planet")
    with pytest.raises(ValueError, match="tinyworld:SHAPE"):
        ci_config(data_dir, subject_class="robot")


def test_objective_is_the_ti_loss_plus_the_methods_regularizer():
    pipe = tiny_pipe()
    ids = add_placeholder(pipe.tokenizer, pipe.text_encoder, "<s>", 2)
    placeholder = PlaceholderVectors(pipe.text_encoder, ids, torch.zeros(2, 32))
    plain = EmbeddingObjective(pipe, placeholder)
    cross_init = EmbeddingObjective(pipe, placeholder, partial(init_distance, weight=0.5))
    with torch.no_grad():  # v - v^0 has norms 5 and 2
        placeholder.vectors.copy_(torch.tensor([[3.0, 4.0] + [0.0] * 30, [0.0] * 31 + [2.0]]))
    batch = {
        "pixel_values": torch.zeros(1, 3, 32, 32),
        "input_ids": torch.tensor([pipe.tokenizer("a <s> <s>_1", padding="max_length", max_length=77).input_ids]),
        "seed": torch.tensor([0]),
    }
    x0 = encode_latents(pipe.vae, batch["pixel_values"])
    noise, t = noise_and_timesteps(batch["seed"], x0.shape[1:], 1000, x0.device, x0.dtype)
    pred = pipe.unet(pipe.scheduler.add_noise(x0, noise, t), t, pipe.text_encoder(batch["input_ids"])[0]).sample
    ti_loss = F.mse_loss(pred, diffusion_target(pipe.scheduler, x0, noise, t))
    assert torch.equal(plain(batch), ti_loss)  # no regulariser: textual inversion's loss, bit for bit
    assert torch.equal(cross_init(batch), ti_loss + 0.5 * torch.tensor(3.5))  # + lambda * mean(5, 2)


def test_samples_depend_only_on_seed_step_and_index(data_dir):
    data = ImageFolder(data_dir, 32, flip_p=0.5)
    a = data.example(sample_rng(0, 5, 3), "<s>")
    b = data.example(sample_rng(0, 5, 3), "<s>")
    assert a["prompt"] == b["prompt"] and torch.equal(a["pixel_values"], b["pixel_values"])
    assert a["prompt"].startswith("a <s> number")
    assert {tuple(it.pixels.shape) for it in data.items} == {(3, 32, 32)}  # mixed sizes and modes fitted


def test_masks_and_txt_captions(tmp_path):
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (40, 40), "red").save(tmp_path / "x.jpg")
    (tmp_path / "x.txt").write_text("a photo of {}")
    Image.new("L", (40, 40), 255).save(tmp_path / "masks" / "x.png")
    data = ImageFolder(tmp_path, 16)
    ex = data.example(sample_rng(0, 0, 0), "<s>")
    assert ex["prompt"] == "a photo of <s>" and ex["mask"].shape == (1, 16, 16) and data.has_masks


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", "no images"),
        ("missing", "does not exist"),
        ("unreadable", "cannot read"),
    ],
)
def test_bad_data_folders(tmp_path, setup, message):
    root = tmp_path / "d"
    if setup != "missing":
        root.mkdir()
    if setup == "unreadable":
        (root / "broken.png").write_bytes(b"not an image")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ImageFolder(root, 32)


def test_bad_tokens_and_words(tmp_path, data_dir):
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        train_cross_init(tiny_pipe(), ci_config(data_dir, placeholder_token="red"), train_config(tmp_path))
    config = TextualInversionConfig(train_data_dir=str(data_dir), initializer_token="red circle")
    with pytest.raises(ValueError, match="single token"):
        train_textual_inversion(tiny_pipe(), config, train_config(tmp_path))
    with pytest.raises(ValueError, match="no reference phrase has a token 2"):
        train_cross_init(tiny_pipe(), ci_config(data_dir, reference_words=["red"]), train_config(tmp_path))
    with pytest.raises(ValueError, match="train_data_dir is empty"):
        CrossInitConfig()
    with pytest.raises(ValueError, match="resolution must be 0"):
        ci_config(data_dir, resolution=-8)
    with pytest.raises(ValueError, match="resolution 1 is not a multiple of 4, which this model needs"):
        train_cross_init(tiny_pipe(), ci_config(data_dir, resolution=1), train_config(tmp_path))
    assert not (tmp_path / "out").exists()  # refused before any work
    with pytest.raises(ValueError, match="max_train_steps"):
        TrainConfig(max_train_steps=0)


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"file_name": "a.png", "text": "a {} with {braces}"}', "braces other than one"),
        ('{"file_name": "a.png", "text": 3}', "is a int, not text"),
        ('["a.png", "a {}"]', "expected"),
    ],
)
def test_bad_captions_are_refused_when_the_data_is_read(tmp_path, row, message):
    from PIL import Image

    from genreg.training import ImageFolder

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(row + "\n")
    with pytest.raises(ValueError, match=message):
        ImageFolder(tmp_path, 32)


def test_16_bit_images_are_scaled_not_clipped_to_white(tmp_path):
    grey = np.full((32, 32), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    pixels = ImageFolder(tmp_path, 32).items[0].pixels
    torch.testing.assert_close(pixels, torch.full_like(pixels, 128 / 127.5 - 1))


def test_a_validation_prompt_needs_its_placeholder(data_dir):
    with pytest.raises(ValueError, match="has no \\{\\} where the token goes"):
        ci_config(data_dir, validation_prompt="a star")
    with pytest.raises(ValueError, match="braces other than one"):
        ci_config(data_dir, validation_prompt="a {} {oops}")

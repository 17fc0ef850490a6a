"""HiFi Tuner: the encoder-output subject (Eq. 6's [c, c_s]), the masked loss (Eq. 5), the step-wise stage
(Algorithm 1) and sampling with its per-step vectors (Eq. 7), on tiny components."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from genreg.methods.hifi_tuner import (
    SUBJECT_FILE,
    HiFiSubject,
    HiFiTunerConfig,
    Replacement,
    empty_tail,
    generate,
    masked_mse,
    replace_last,
    replace_subject,
    token_alignment,
    train_hifi_tuner,
)
from genreg.methods.hifi_tuner.reference import align_masks, warp
from genreg.methods.hifi_tuner.trainer import STEPWISE_STAGE
from genreg.testing import tiny_sd_pipeline as tiny_pipe
from genreg.training import TrainConfig, load_checkpoint


@pytest.fixture
def kit(tmp_path):
    """Two captioned images, each with a mask of its left half."""
    root = tmp_path / "kit"
    (root / "masks").mkdir(parents=True)
    for name, colour in (("a", (220, 40, 40)), ("b", (40, 80, 220))):
        Image.new("RGB", (32, 32), colour).save(root / f"{name}.png")
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32))
        mask.save(root / "masks" / f"{name}.png")
    rows = [{"file_name": n, "text": "a {} in the center"} for n in ("a.png", "b.png")]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def hifi_config(kit, **kwargs) -> HiFiTunerConfig:
    defaults = {"subject_word": "circle", "num_vectors": 3, "flip_p": 0.0, "num_inference_steps": 3}
    return HiFiTunerConfig(train_data_dir=str(kit), **(defaults | {"stepwise_steps": 2} | kwargs))


def train_config(tmp_path, name: str = "out", **kwargs) -> TrainConfig:
    defaults = {"max_train_steps": 4, "train_batch_size": 2, "checkpointing_steps": 2, "report_to": "none"}
    return TrainConfig(output_dir=str(tmp_path / name), adam_weight_decay=0.0, **(defaults | kwargs))


# --- the math


def test_the_subject_replaces_only_the_last_positions_and_starts_as_the_empty_prompt():
    pipe = tiny_pipe()
    embeds = torch.randn(2, 77, 32)
    vectors = torch.randn(3, 32)
    out = replace_last(embeds, vectors)
    assert torch.equal(out[:, :-3], embeds[:, :-3]) and torch.equal(out[:, -3:], vectors.expand(2, -1, -1))
    phi, _ = pipe.encode_prompt("", "cpu", 1, False)
    tail = empty_tail(pipe.text_encoder, pipe.tokenizer, 3)
    assert torch.equal(replace_last(phi, tail), phi)  # [phi, phi_s] = phi: the unoptimized subject changes nothing


def test_masked_loss_reads_only_the_mask_and_averages_over_it():
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.allclose(masked_mse(pred, target, torch.ones(2, 1, 32, 32)), masked_mse(pred, target, None))
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., :16] = 1  # the left half of the image = the left half of the latent grid
    changed = pred.clone()
    changed[..., 4:] += 5.0  # outside the mask
    assert torch.allclose(masked_mse(changed, target, mask), masked_mse(pred, target, mask))
    left = (pred[..., :4] - target[..., :4]).pow(2).mean()
    assert torch.allclose(masked_mse(pred, target, mask), left)  # a mean over the masked entries, not the image


# --- training


def test_shared_then_stepwise_sets_each_row_starting_from_the_last_and_left_where_it_ended(tmp_path, kit):
    pipe = tiny_pipe()
    train = train_config(tmp_path)
    path = train_hifi_tuner(pipe, hifi_config(kit), train)
    assert path.name == SUBJECT_FILE
    subject = HiFiSubject.load(tmp_path / "out")
    phi_s = empty_tail(pipe.text_encoder, pipe.tokenizer, 3)
    assert subject.vectors.shape == (3, 32) and not torch.allclose(subject.vectors, phi_s)  # moved from phi_s
    assert subject.step_vectors.shape == (3, 3, 32) and subject.timesteps == [667, 334, 1]
    assert subject.num_inference_steps == 3 and subject.scheduler == "DDIMScheduler"
    stage = tmp_path / "out" / STEPWISE_STAGE
    after_row0 = load_checkpoint(stage / "checkpoint-2")[1]["vectors"]  # each row trains 2 steps
    assert not torch.allclose(after_row0[0], subject.vectors)
    assert torch.equal(after_row0[1:], subject.vectors.expand(2, -1, -1))  # later rows untouched so far
    assert torch.equal(subject.step_vectors[0], after_row0[0])  # a finished row stays (fresh moments, no decay)
    after_row1 = load_checkpoint(stage / "checkpoint-4")[1]["vectors"]
    assert torch.equal(subject.step_vectors[1], after_row1[1])
    assert not torch.allclose(subject.step_vectors[2], subject.step_vectors[1])


def test_the_regularizer_pulls_toward_the_empty_prompt_and_masks_are_read(tmp_path, kit):
    phi_s = empty_tail(tiny_pipe().text_encoder, tiny_pipe().tokenizer, 3)
    distance = {}
    for weight in (0.0, 50.0):
        out = train_hifi_tuner(
            tiny_pipe(),
            hifi_config(kit, reg_weight=weight, stepwise_steps=0),
            train_config(tmp_path, f"w{weight}", max_train_steps=6, learning_rate=5e-2),
        )
        distance[weight] = (HiFiSubject.load(out).vectors - phi_s).norm()
    assert distance[50.0] < 0.5 * distance[0.0]
    masked = HiFiSubject.load(tmp_path / "w0.0").vectors
    plain = train_hifi_tuner(
        tiny_pipe(),
        hifi_config(kit, reg_weight=0.0, stepwise_steps=0, mask_guidance=False),
        train_config(tmp_path, "plain", max_train_steps=6, learning_rate=5e-2),
    )
    assert not torch.allclose(HiFiSubject.load(plain).vectors, masked)


def test_the_dreambooth_variant_tunes_the_unet_under_the_mask_and_loads_with_the_standard_tools(tmp_path, kit):
    from diffusers import UNet2DConditionModel

    base = tiny_pipe()
    weights = {k: v.clone() for k, v in base.unet.state_dict().items()}
    lora = dict(variant="dreambooth", lora_rank=2)
    path = train_hifi_tuner(base, hifi_config(kit, **lora), train_config(tmp_path, "lora", learning_rate=1e-3))
    subject = HiFiSubject.load(path)
    assert subject.subject_word == "sks circle" and subject.unet == "pytorch_lora_weights.safetensors"
    assert (
        torch.equal(subject.vectors, empty_tail(base.text_encoder, base.tokenizer, 3)) and subject.step_vectors is None
    )
    pipe = tiny_pipe()
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())  # a fresh pipe as it was
    common = {"num_inference_steps": 3, "output_type": "np", "guidance_scale": 3.0}
    before = generate(pipe, subject, "a sks circle", generator=torch.Generator().manual_seed(0), **common).images
    pipe.load_lora_weights(str(tmp_path / "lora"))
    after = generate(pipe, subject, "a sks circle", generator=torch.Generator().manual_seed(0), **common).images
    assert not np.allclose(before, after)

    whole = train_hifi_tuner(
        tiny_pipe(), hifi_config(kit, variant="dreambooth"), train_config(tmp_path, "whole", learning_rate=1e-3)
    )
    assert HiFiSubject.load(whole).unet == "unet"
    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "whole", subfolder="unet")
    assert any(not torch.equal(v, weights[k]) for k, v in tuned.state_dict().items())
    unmasked = hifi_config(kit, variant="dreambooth", mask_guidance=False)
    train_hifi_tuner(tiny_pipe(), unmasked, train_config(tmp_path, "plain", learning_rate=1e-3))
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "plain", subfolder="unet").state_dict()
    assert any(not torch.equal(v, plain[k]) for k, v in tuned.state_dict().items())  # the mask weighs the loss
    with pytest.raises(ValueError, match="5e-6 for the whole UNet"):
        train_hifi_tuner(tiny_pipe(), hifi_config(kit, variant="dreambooth"), train_config(tmp_path, "bad"))
    with pytest.raises(ValueError, match="variant must be one of"):
        hifi_config(kit, variant="lora")
    with pytest.raises(ValueError, match="identifier is empty"):
        hifi_config(kit, variant="dreambooth", identifier=" ")
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        hifi_config(kit, variant="dreambooth", lora_rank=-1)


def test_a_resumed_run_matches_an_uninterrupted_one_across_both_stages(tmp_path, kit):
    whole = HiFiSubject.load(train_hifi_tuner(tiny_pipe(), hifi_config(kit), train_config(tmp_path, "whole")))
    calls = iter(range(100))
    stop_at = {3, 7}  # once in the shared stage, once in the step-wise stage
    first = train_hifi_tuner(
        tiny_pipe(), hifi_config(kit), train_config(tmp_path, "parts"), should_stop=lambda: next(calls) in stop_at
    )
    assert HiFiSubject.load(first).step_vectors is None  # stopped before the step-wise set was made
    again = train_config(tmp_path, "parts", resume_from_checkpoint="latest")
    for _ in range(2):
        path = train_hifi_tuner(tiny_pipe(), hifi_config(kit), again, should_stop=lambda: next(calls) in stop_at)
    parts = HiFiSubject.load(path)
    assert torch.equal(parts.vectors, whole.vectors) and torch.equal(parts.step_vectors, whole.step_vectors)


# --- sampling


def test_generation_swaps_in_each_steps_vectors(tmp_path, kit):
    pipe = tiny_pipe()
    subject = HiFiSubject.load(train_hifi_tuner(tiny_pipe(), hifi_config(kit), train_config(tmp_path)))
    seen = []
    encode = pipe.unet.forward

    def spy(sample, t, encoder_hidden_states, *args, **kwargs):
        seen.append(encoder_hidden_states[-1, -3:].clone())
        return encode(sample, t, encoder_hidden_states, *args, **kwargs)

    pipe.unet.forward = spy
    common = {"generator": torch.Generator().manual_seed(0), "output_type": "np", "guidance_scale": 3.0}
    stepwise = generate(pipe, subject, "a circle in the center", **common).images
    assert len(seen) == 3 and all(torch.allclose(v, r) for v, r in zip(seen, subject.step_vectors, strict=True))
    seen.clear()
    common["generator"] = torch.Generator().manual_seed(0)
    shared = generate(pipe, subject, "a circle in the center", stepwise=False, num_inference_steps=3, **common).images
    assert all(torch.allclose(v, subject.vectors) for v in seen)
    assert stepwise.shape == shared.shape == (1, 32, 32, 3) and not (stepwise == shared).all()

    # a caller's own step-end callback runs too, sees the tensors it asks for, and can stop the loop
    calls = []

    def stop_after_one(pipe, i, t, tensors):
        calls.append((i, sorted(tensors)))
        pipe._interrupt = True
        return {}

    common["generator"] = torch.Generator().manual_seed(0)
    seen.clear()
    generate(
        pipe,
        subject,
        "a circle in the center",
        callback_on_step_end=stop_after_one,
        callback_on_step_end_tensor_inputs=["latents"],
        **common,
    )
    assert calls == [(0, ["latents", "prompt_embeds"])] and len(seen) == 1


def test_step_count_scheduler_and_prompt_length_are_checked_with_the_fix(tmp_path, kit):
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_pipe()
    subject = HiFiSubject.load(train_hifi_tuner(tiny_pipe(), hifi_config(kit), train_config(tmp_path)))
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        generate(pipe, subject, "a circle", num_inference_steps=5)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    with pytest.raises(ValueError, match="stepwise=False"):
        generate(pipe, subject, "a circle")
    with pytest.raises(ValueError, match="shorten it"):
        generate(tiny_pipe(), subject, " ".join(["circle"] * 74))


# --- bad input


def test_bad_files_and_data_are_refused(tmp_path, kit):
    save_file({"<s>": torch.zeros(2, 32)}, str(tmp_path / "token.safetensors"))
    with pytest.raises(ValueError, match="load_textual_inversion"):
        HiFiSubject.load(tmp_path / "token.safetensors")
    with pytest.raises(FileNotFoundError, match=SUBJECT_FILE):
        HiFiSubject.load(tmp_path)
    (kit / "masks" / "b.png").unlink()
    with pytest.raises(ValueError, match="no-mask_guidance"):
        train_hifi_tuner(tiny_pipe(), hifi_config(kit), train_config(tmp_path))
    Image.new("L", (32, 32), 0).save(kit / "masks" / "b.png")
    with pytest.raises(ValueError, match="empty"):
        train_hifi_tuner(tiny_pipe(), hifi_config(kit), train_config(tmp_path))
    with pytest.raises(ValueError, match="shorten"):
        train_hifi_tuner(tiny_pipe(), hifi_config(kit, num_vectors=72, mask_guidance=False), train_config(tmp_path))
    for change, message in (
        ({"subject_word": " "}, "class"),
        ({"num_vectors": 0}, "num_vectors"),
        ({"reg_weight": -1.0}, "reg_weight"),
        ({"stepwise_steps": -1}, "stepwise_steps"),
    ):
        with pytest.raises(ValueError, match=message):
            hifi_config(kit, **change)
    assert not (tmp_path / "out").exists()  # nothing written


def test_genreg_train_hifi_tuner_writes_a_subject_that_samples(tmp_path, kit, capsys):
    from diffusers import StableDiffusionPipeline

    from genreg.cli import main
    from genreg.testing import tiny_sd_components

    model = tmp_path / "model"
    StableDiffusionPipeline(**tiny_sd_components(0)).save_pretrained(model)
    argv = ["train", "hifi-tuner", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(kit)]
    argv += ["--subject_word", "circle", "--num_inference_steps", "3", "--stepwise_steps", "1", "--max_train_steps"]
    argv += ["2", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    assert main(argv) == 0
    assert SUBJECT_FILE in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(model)
    subject = HiFiSubject.load(tmp_path / "out")
    assert subject.step_vectors.shape[0] == 3 and subject.vectors.shape == (5, 32)  # the method's own n = 5
    images = generate(pipe, subject, "a circle", output_type="np", num_images_per_prompt=2).images
    assert images.shape == (2, 32, 32, 3)


# --- reference-guided generation


def l_shape(size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[8:24, 8:13] = True
    mask[19:24, 8:20] = True  # an L: no symmetry, so rotation and scale are determined
    return mask


def test_the_alignment_recovers_a_similarity_transform():
    source = l_shape()
    angle, scale, shift = 0.3, 0.8, (0.15, -0.1)
    truth = torch.tensor(
        [
            [scale * np.cos(angle), -scale * np.sin(angle), shift[0]],
            [scale * np.sin(angle), scale * np.cos(angle), shift[1]],
        ],
        dtype=torch.float32,
    )
    target = warp(torch.from_numpy(source.astype(np.float32))[None], truth)[0].numpy() > 0.5
    found = align_masks(source, target, steps=300)
    moved = warp(torch.from_numpy(source.astype(np.float32))[None], found)[0].numpy() > 0.5
    assert (moved & target).sum() / (moved | target).sum() > 0.8  # IoU of the aligned mask with the target
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    assert torch.allclose(warp(torch.ones(3, 8, 8), identity), torch.ones(3, 8, 8))


def test_the_moved_reference_shows_its_own_background_where_the_move_uncovers_it():
    from genreg.methods.hifi_tuner.reference import Reference, ReferenceGuidance, aligned_reference

    pixels = np.full((32, 32, 3), 240, np.uint8)  # a light ground with a red square at the right edge
    pixels[8:24, 20:32] = (200, 30, 30)
    source = np.zeros((32, 32), bool)
    source[8:24, 20:32] = True
    target = np.zeros((32, 32), bool)
    target[8:24, 4:16] = True  # moved to the left: the image's right part is uncovered
    reference = Reference(Image.fromarray(pixels), source, "a red square")
    moved, weights = aligned_reference(reference, target, ReferenceGuidance(align_steps=50))
    moved = np.asarray(moved)
    assert (moved[12:20, 6:14] == (200, 30, 30)).all(-1).mean() > 0.9  # the subject, where the target is
    assert (np.abs(moved[:, 26:].astype(int) - 240) <= 2).all()  # the uncovered strip is the ground, not black
    assert weights[12:20, 6:14].min() > 0.9 and weights[:, 26:].max() < 0.1
    black, _ = aligned_reference(reference, target, ReferenceGuidance(align_steps=50, fill="zeros"))
    assert (np.asarray(black)[:, 28:] == 0).all()
    with pytest.raises(ValueError, match="fill"):
        ReferenceGuidance(fill="white")
    with pytest.raises(ValueError, match="mask_coverage"):
        ReferenceGuidance(mask_coverage=1.0)


def test_object_mask_finds_the_object_at_the_asked_place():
    from genreg.tinyworld import render
    from genreg.tinyworld.subjects import object_mask
    from genreg.tinyworld.world import Obj, Scene

    scene = Scene((Obj("square", "red", "large", "left"), Obj("circle", "blue", "small", "right")), "black")
    image, masks = render(scene)
    for i, position in enumerate(("left", "right")):
        found = object_mask(image, position)
        assert (found & masks[i]).sum() / (found | masks[i]).sum() > 0.9
    assert not object_mask(Image.new("RGB", (64, 64), (240, 240, 240)), "left").any()  # nothing drawn


def test_reference_guided_generation_picks_aligns_inverts_and_guides(tmp_path, kit):
    from genreg.methods.hifi_tuner.reference import Reference, ReferenceGuidance, reference_guided

    pipe = tiny_pipe()
    subject = HiFiSubject.load(train_hifi_tuner(tiny_pipe(), hifi_config(kit), train_config(tmp_path)))
    references = [
        Reference(Image.open(kit / f"{n}.png"), np.asarray(Image.open(kit / "masks" / f"{n}.png")) > 127, "a circle")
        for n in ("a", "b")
    ]
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])  # the draw, then the references: b is closest
    square = np.zeros((32, 32), bool)
    square[4:20, 6:22] = True
    common = {"guidance_scale": 3.0, "embed": lambda images: features[: len(images)]}

    def draw(segment, inner_steps):
        settings = ReferenceGuidance(inner_steps=inner_steps, align_steps=20)
        generator = torch.Generator().manual_seed(0)
        return reference_guided(
            pipe, subject, "a circle", references, segment, generator=generator, settings=settings, **common
        )

    image, info = draw(lambda image: square, 2)
    assert info["reference"] == 1 and image.size == (32, 32) and info["aligned_mask"].any()
    plain, unfitted = draw(lambda image: square, 0)
    guided_steps = len(info["window_error"])
    assert guided_steps > 1 and len(unfitted["window_error"]) == guided_steps
    assert sum(info["window_error"]) < sum(unfitted["window_error"])  # phi_h's steps keep closer to the reference
    unguided, skipped = draw(lambda image: np.zeros((32, 32), bool), 2)
    assert "skipped" in skipped and np.array_equal(np.asarray(unguided), np.asarray(skipped["first"]))
    first = np.asarray(info["first"], np.float32)
    assert not np.array_equal(np.asarray(plain), first)  # the pasted inverted reference changes the draw
    assert not np.array_equal(np.asarray(image), np.asarray(plain))  # and phi_h's steps change it further


# --- subject replacement (Algorithm 3)


def test_token_alignment_keeps_the_sources_maps_but_for_the_swapped_word_and_the_vectors():
    tokenizer = tiny_pipe().tokenizer
    columns, fresh = token_alignment(tokenizer, "a red circle on the left", "a red star on the left", 3)
    ids = tokenizer("a red star on the left").input_ids
    swapped = ids.index(tokenizer.convert_tokens_to_ids("star</w>"))
    assert fresh.nonzero().flatten().tolist() == [swapped, 74, 75, 76]
    assert torch.equal(columns[:20], torch.arange(20))
    # a longer source: the words after the swap read the source's shifted columns
    columns, fresh = token_alignment(tokenizer, "a red big circle on the left", "a red star on the left", 3)
    assert fresh[swapped] and columns[swapped + 1] == swapped + 2
    with pytest.raises(ValueError, match="same tokens"):
        token_alignment(tokenizer, "a red circle", "a red circle", 3)


def test_replacement_inverts_once_and_reuses_its_inversion(tmp_path, kit):
    pipe = tiny_pipe()
    subject = HiFiSubject.load(train_hifi_tuner(tiny_pipe(), hifi_config(kit), train_config(tmp_path)))
    image = Image.open(kit / "a.png")
    prompts = ("a red square in the center", "a red circle in the center")
    settings = Replacement(null_text_steps=2)
    reports = []
    edited, info = replace_subject(
        pipe, subject, image, *prompts, guidance_scale=3.0, settings=settings, on_step=lambda *r: reports.append(r)
    )
    assert reports == [(k, 9) for k in range(1, 10)]  # inversion, null-text and sampling steps, three each
    again, _ = replace_subject(pipe, subject, image, *prompts, guidance_scale=3.0, inverted=info["inverted"])
    assert edited.size == info["reconstruction"].size == (32, 32)
    assert np.array_equal(np.asarray(edited), np.asarray(again))
    x_T, phis = info["inverted"]
    assert len(phis) == 3 and not torch.equal(phis[0], phis[-1])  # one null text per step, fitted
    plain, _ = replace_subject(
        pipe,
        subject,
        image,
        *prompts,
        guidance_scale=3.0,
        inverted=info["inverted"],
        settings=Replacement(inject=False),
    )
    assert not np.array_equal(np.asarray(plain), np.asarray(edited))  # the injection changes the drawing
    with pytest.raises(ValueError, match="invert again"):
        replace_subject(pipe, subject, image, *prompts, inverted=(x_T, phis[:2]))
    with pytest.raises(ValueError, match="null_text_steps"):
        Replacement(null_text_steps=-1)

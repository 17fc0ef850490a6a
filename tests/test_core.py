"""CoRe: its context regularizers (Eqs. 3, 4, 6) as functions, and its stages on tiny components."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from PIL import Image

from genreg.attention import AttentionRecord
from genreg.embeddings import INIT_FILE, PlaceholderVectors, add_placeholder, load_learned_embeds, placeholder_names
from genreg.methods.core import (
    Contexts,
    CoReConfig,
    CoReObjective,
    context_attention_loss,
    context_embedding_loss,
    context_positions,
    tinyworld_contexts,
    token_attention,
    train_core,
    tune_for_prompt,
)
from genreg.methods.core.trainer import TEST_TIME, UNET_STAGE
from genreg.testing import tiny_sd_pipeline as tiny_pipe
from genreg.tinyworld.subjects import SUBJECTS, evaluation_cases
from genreg.training import TrainConfig, list_checkpoints

CONTEXTS = ["a {} on the left", "a large {} at the top and a blue square at the bottom", "a small {} on the right"]


@pytest.fixture
def kit(tmp_path):
    """Two images with captions, and a file of regularization contexts in the tiny tokenizer's words."""
    root = tmp_path / "kit"
    root.mkdir()
    Image.new("RGB", (32, 32), (220, 40, 40)).save(root / "a.png")
    Image.new("RGB", (32, 32), (40, 80, 220)).save(root / "b.png")
    rows = [{"file_name": n, "text": "a {} in the center"} for n in ("a.png", "b.png")]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "contexts.txt").write_text("# contexts\n" + "\n".join(CONTEXTS) + "\n\n")
    return root


def core_config(kit, **kwargs) -> CoReConfig:
    defaults = {"placeholder_token": "<s>", "initializer_token": "circle", "flip_p": 0.0}
    defaults["prompt_file"] = str(kit.parent / "contexts.txt")
    return CoReConfig(train_data_dir=str(kit), **(defaults | kwargs))


def train_config(tmp_path, name: str = "out", **kwargs) -> TrainConfig:
    defaults = {"max_train_steps": 6, "train_batch_size": 2, "checkpointing_steps": 2, "report_to": "none"}
    return TrainConfig(output_dir=str(tmp_path / name), **(defaults | kwargs))


# --- the math


def test_context_positions_take_the_first_end_token_and_skip_the_subject():
    ids = [0, 5, 9, 9, 6, 1, 1, 1]  # SOT, "a", subject (2 tokens), "x", EOT, padding = EOT (SD 1.x)
    assert context_positions(ids, 2, 2, eos_id=1) == [0, 1, 4, 5]
    assert context_positions([0, 5, 9, 6, 1, 7, 7], 2, 1, eos_id=1) == [0, 1, 3, 4]  # SD 2.x pads with "!"
    with pytest.raises(ValueError, match="too long"):
        context_positions([0, 5, 9, 6], 2, 1, eos_id=1)


def test_contexts_pair_the_same_words_under_subject_and_category():
    pipe = tiny_pipe()
    add_placeholder(pipe.tokenizer, pipe.text_encoder, "<s>", 2)
    contexts = Contexts(pipe.tokenizer, CONTEXTS, ["<s>", "<s>_1"], "circle")
    subject_ids = set(pipe.tokenizer.convert_tokens_to_ids(["<s>", "<s>_1"]))
    (circle,) = pipe.tokenizer("circle", add_special_tokens=False).input_ids
    for ids, cat_ids, mask, cat_mask in contexts.rows:
        assert mask.sum() == cat_mask.sum()
        assert torch.equal(ids[mask], cat_ids[cat_mask])  # the same context tokens, in order
        assert not subject_ids & set(ids[mask].tolist())  # the subject is excluded ...
        assert circle not in cat_ids[cat_mask].tolist() and circle in cat_ids.tolist()  # ... and the category word
        assert ids[mask][-1] == pipe.tokenizer.eos_token_id and (~mask[mask.nonzero()[-1] + 1 :]).all()  # no padding
    draws = {contexts.sample(0, s, 0)["context_ids"].sum().item() for s in range(20)}
    assert len(draws) == len(CONTEXTS)
    assert contexts.sample(0, 3, 1)["context_ids"].equal(contexts.sample(0, 3, 1)["context_ids"])  # deterministic


def test_embedding_loss_is_eq3_per_token_cosine_over_features():
    g = torch.Generator().manual_seed(0)
    h, c = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    cat_mask = torch.tensor([[1, 0, 1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    want = []
    for b in range(2):
        pairs = zip(mask[b].nonzero().flatten().tolist(), cat_mask[b].nonzero().flatten().tolist(), strict=True)
        want.append(np.mean([1 - F.cosine_similarity(h[b, i], c[b, j], dim=0).item() for i, j in pairs]))
    assert context_embedding_loss(h, c, mask, cat_mask).item() == pytest.approx(np.mean(want), rel=1e-5)
    same = c.clone()
    same[:, 1] = torch.randn(2, 16, generator=g)  # only the subject's position differs: it is not regularized
    assert context_embedding_loss(same, c, cat_mask, cat_mask).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_means_heads_and_pixels_then_layers_and_loss_is_eq4():
    g = torch.Generator().manual_seed(1)
    layers = {f"l{i}": [AttentionRecord(1.0, probs=torch.rand(2, 3, 5, 6, generator=g))] for i in range(4)}
    mu = token_attention(layers)
    want = torch.stack([r[0].probs.mean(dim=(1, 2)) for r in layers.values()]).mean(0)
    assert mu.shape == (2, 6) and torch.allclose(mu, want)
    other = mu.clone()
    other[:, 1] += 1.0  # the subject's column
    mask = torch.tensor([[1, 0, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    assert context_attention_loss(other, mu, mask, mask).item() == pytest.approx(0.0)
    other[:, 2] += 0.5
    assert context_attention_loss(other, mu, mask, mask).item() == pytest.approx(0.25 / 3)


def test_a_context_cut_by_the_tokenizer_under_more_vectors_is_refused():
    pipe = tiny_pipe()
    names = placeholder_names("<s>", 4)
    add_placeholder(pipe.tokenizer, pipe.text_encoder, "<s>", 4)
    long = "a {} " + "and a red circle on the left " * 10 + "at the top"  # fits under the category, not 4 vectors
    assert len(pipe.tokenizer(long.format("circle")).input_ids) == 77
    with pytest.raises(ValueError, match="shorten it"):
        Contexts(pipe.tokenizer, [long.strip()], names, "circle")


def test_tinyworld_contexts_leave_the_benchmark_prompts_out():
    contexts = tinyworld_contexts()
    held_out = {c.template for s in SUBJECTS.values() for c in evaluation_cases(s)}
    assert len(contexts) > 40 and not held_out & set(contexts)
    assert all(t.count("{}") == 1 for t in contexts)


# --- the stages on tiny components


def test_stage1_trains_only_the_token_holds_the_norm_in_its_window_and_loads(tmp_path, kit):
    pipe = tiny_pipe()
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    processors = dict(pipe.unet.attn_processors)
    path = train_core(pipe, core_config(kit, rescale_start=0.0, rescale_end=1.0), train_config(tmp_path))
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[: len(table)], table)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet.items())
    assert all(pipe.unet.attn_processors[k] is p for k, p in processors.items())  # recorders removed
    token, vectors = load_learned_embeds(path)
    _, init = load_learned_embeds(tmp_path / "out" / INIT_FILE)
    assert token == "<s>" and vectors.shape == (1, 32) and not torch.equal(vectors, init)
    assert vectors.norm() == pytest.approx(init.norm().item(), rel=1e-5)  # Eq. 6 on every step
    free = train_core(tiny_pipe(), core_config(kit, rescale_start=0.5, rescale_end=0.5), train_config(tmp_path, "f"))
    assert load_learned_embeds(free)[1].norm() != pytest.approx(init.norm().item(), rel=1e-3)

    fresh = tiny_pipe()
    fresh.load_textual_inversion(str(tmp_path / "out"))  # the standard loader
    kwargs = {"num_inference_steps": 2, "output_type": "np"}
    a = pipe("a <s>", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = fresh("a <s>", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.array_equal(a, b)


def test_each_regularizer_moves_the_token_and_its_weight_zero_leaves_it_out(tmp_path, kit):
    pipe = tiny_pipe()
    ids = add_placeholder(pipe.tokenizer, pipe.text_encoder, "<s>", 1)
    placeholder = PlaceholderVectors(pipe.text_encoder, ids, pipe.text_encoder.get_input_embeddings().weight[ids])
    contexts = Contexts(pipe.tokenizer, CONTEXTS, ["<s>"], "circle")
    data = core_config(kit).read(pipe)
    from torch.utils.data import default_collate

    batch = default_collate([data.sample(pipe.tokenizer, 0, 0, i, "<s>") | contexts.sample(0, 0, i) for i in range(2)])
    grads = {}
    for name, weights in {"embedding": (0, 1, 0), "attention": (0, 0, 1), "none": (0, 0, 0)}.items():
        loss = CoReObjective(pipe, placeholder, *weights)(batch)
        if name == "none":
            assert loss.item() == 0 and not loss.requires_grad
            continue
        (grad,) = torch.autograd.grad(loss, placeholder.vectors)
        grads[name] = grad
        assert loss.item() > 0 and grad.abs().sum() > 0
    assert not torch.allclose(grads["embedding"], grads["attention"])


def test_resume_matches_an_uninterrupted_run_across_the_rescaling_window(tmp_path, kit):
    config = core_config(kit, rescale_start=0.3, rescale_end=0.7)
    whole = train_core(tiny_pipe(), config, train_config(tmp_path, "whole"))
    calls = iter(range(100))
    train_core(tiny_pipe(), config, train_config(tmp_path, "split"), should_stop=lambda: next(calls) == 2)
    resumed = train_core(tiny_pipe(), config, train_config(tmp_path, "split", resume_from_checkpoint="latest"))
    assert torch.equal(load_learned_embeds(whole)[1], load_learned_embeds(resumed)[1])


def test_a_stop_in_stage1_skips_the_later_stages_until_the_run_resumes(tmp_path, kit):
    config = core_config(kit, unet_steps=2, unet_learning_rate=1e-3, tto_prompt="a {} on the left", tto_steps=2)
    calls, seen = iter(range(100)), []
    train_core(tiny_pipe(), config, train_config(tmp_path), should_stop=lambda: next(calls) == 2, on_step=None)
    assert not (tmp_path / "out" / UNET_STAGE).exists() and not (tmp_path / "out" / "unet").exists()
    resumed = train_config(tmp_path, resume_from_checkpoint="latest")
    path = train_core(tiny_pipe(), config, resumed, on_step=lambda step, loss: seen.append(step))
    assert seen == [4, 5, 6, 7, 8, 9, 10]  # stage 1's last steps, then stage 2 and test-time counted on
    assert (tmp_path / "out" / "unet").is_dir() and path == tmp_path / "out" / TEST_TIME / "learned_embeds.safetensors"


def test_stage2_tunes_the_unet_with_the_token_frozen_and_saves_standard_files(tmp_path, kit):
    pipe = tiny_pipe()
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    path = train_core(pipe, core_config(kit, unet_steps=3, unet_learning_rate=1e-3), train_config(tmp_path))
    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet")
    assert any(not torch.equal(v, tuned.state_dict()[k]) for k, v in base.items())
    # a whole UNet's checkpoints are large: stage 2 keeps the newest unless --checkpoints_total_limit says more
    assert [c.name for c in list_checkpoints(tmp_path / "out" / UNET_STAGE)] == ["checkpoint-3"]
    token_row = pipe.text_encoder.get_input_embeddings().weight[-1]
    assert torch.equal(token_row, load_learned_embeds(path)[1][0])  # stage 2 leaves the token as stage 1 wrote it

    lora = tiny_pipe()
    train_core(
        lora, core_config(kit, unet_steps=2, unet_lora_rank=2, unet_learning_rate=1e-2), train_config(tmp_path, "l")
    )
    fresh = tiny_pipe()
    fresh.load_textual_inversion(str(tmp_path / "l"))
    plain = fresh("a <s>", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    fresh.load_lora_weights(str(tmp_path / "l"))  # diffusers' LoRA loader
    loaded = fresh("a <s>", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert not np.array_equal(plain, loaded)


def test_test_time_optimization_tunes_a_loaded_token_for_one_prompt(tmp_path, kit):
    first = train_core(tiny_pipe(), core_config(kit), train_config(tmp_path))
    pipe = tiny_pipe()
    config = core_config(kit)
    train = train_config(tmp_path, "tto", max_train_steps=3, learning_rate=5e-2)
    with pytest.raises(ValueError, match="load_textual_inversion"):
        tune_for_prompt(pipe, config, train, "a {} on the left")
    pipe.load_textual_inversion(str(first.parent))
    with pytest.raises(ValueError, match="pass its --num_vectors"):
        tune_for_prompt(pipe, core_config(kit, num_vectors=2), train, "a {} on the left")
    with pytest.raises(ValueError, match="exactly one"):
        tune_for_prompt(pipe, config, train, "on the left")
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    path = tune_for_prompt(pipe, config, train, "a {} on the left")
    before, after = load_learned_embeds(first)[1], load_learned_embeds(path)[1]
    assert not torch.equal(before, after)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[:-1], table[:-1])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"initializer_token": "red circle"}, "single token"),
        ({"placeholder_token": "circle"}, "already in the tokenizer"),
    ],
)
def test_bad_category_and_placeholder_are_refused_before_training(tmp_path, kit, change, message):
    with pytest.raises(ValueError, match=message):
        train_core(tiny_pipe(), core_config(kit, **change), train_config(tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, change, message",
    [
        ("", {}, "holds no prompt"),
        ("\xff\xfe not text", {}, "not UTF-8"),
        ("a {} and a {}", {}, "braces other than one"),
        ("a circle", {}, "exactly one"),
        (None, {"prompt_file": "missing.txt"}, "not found"),
        (None, {"rescale_start": 0.7, "rescale_end": 0.3}, "rescale_start <= rescale_end"),
        (None, {"tto_prompt": "on the left"}, "exactly one"),
        (None, {"attention_weight": -1.0}, "attention_weight must be >= 0"),
        (None, {"tto_prompt": "a {}", "embedding_weight": 0.0, "attention_weight": 0.0}, "needs a regularizer"),
        (None, {"prompt_file": "."}, "cannot read"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(tmp_path, kit, text, change, message):
    if text is not None:
        (kit.parent / "contexts.txt").write_bytes(text.encode("latin-1"))
    if "prompt_file" in change:
        change = {"prompt_file": str(tmp_path / change["prompt_file"])}  # "." is a folder
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        core_config(kit, **change)

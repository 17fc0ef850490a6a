"""SaRA: the selection, the sparse leaves and their gradient, the optimizer, the low-rank loss, progressive
re-selection, the delta file (merge, unmerge, scale, combine, base checks) and the trainer on the shared loop."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from genreg.cli import main
from genreg.methods.sara import (
    DELTA_FILE,
    SaRAAdamW,
    SaRAConfig,
    SaRADelta,
    SaRATrainingConfig,
    auto_learning_rate,
    load_into,
    merge,
    merged,
    prepare,
    rank_loss,
    select,
    train_sara,
    unmerge,
)
from genreg.testing import tiny_sd_components
from genreg.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.02  # the tiny random UNet's weights are larger than a trained model's


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    return tiny_sd_components(seed)["unet"]


def unet_inputs(seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


def output(unet) -> torch.Tensor:
    with torch.no_grad():
        return unet(*unet_inputs()).sample


# --- selection and the sparse leaves ---------------------------------------------------------------------------------


def test_the_selection_is_every_targeted_weight_below_the_threshold():
    unet = tiny_unet()
    selection = select(unet, SaRAConfig(threshold=THRESHOLD))
    for name, p in unet.named_parameters():
        want = (p.detach().abs() < THRESHOLD).flatten().nonzero().squeeze(1)
        if len(want):
            assert torch.equal(selection[name], want)
    attn = select(unet, SaRAConfig(threshold=THRESHOLD, targets=("*attn*",), exclude=("*to_out*",)))
    assert attn and all("attn" in n and "to_out" not in n for n in attn)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"threshold": 0.0}, "threshold must be a positive number"),
        ({"threshold": -1e-3}, "threshold must be a positive number"),
        ({"threshold": float("nan")}, "threshold must be a positive number"),
        ({"lambda_rank": -1.0}, "lambda_rank must be"),
        ({"progressive_fraction": 1.0}, "progressive_fraction must be in"),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        SaRAConfig(**changes)


def test_no_match_and_nothing_selected_are_clear_errors():
    with pytest.raises(ValueError, match="no parameter name matches targets"):
        select(tiny_unet(), SaRAConfig(targets=("text_model.*",)))
    with pytest.raises(ValueError, match="no weight of the .* targeted tensors is below threshold 1e-12"):
        select(tiny_unet(), SaRAConfig(threshold=1e-12, targets=("*conv*.weight",)))  # biases start at 0


def test_prepared_model_computes_as_before_and_trains_only_the_selected_values():
    unet = tiny_unet()
    before = output(unet)
    sara = prepare(unet, SaRAConfig(threshold=THRESHOLD))
    assert torch.equal(output(unet), before)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".values") for n in trainable)
    assert sara.num_trainable() == sum(len(i) for i in select(tiny_unet(), SaRAConfig(threshold=THRESHOLD)).values())


def test_the_values_gradient_is_the_dense_gradient_at_the_selected_entries_and_no_dense_gradient_is_kept():
    reference = tiny_unet()
    sara = prepare(tiny_unet(), SaRAConfig(threshold=THRESHOLD))
    sara(*unet_inputs()).sample.square().mean().backward()
    reference(*unet_inputs()).sample.square().mean().backward()
    dense = dict(reference.named_parameters())
    for name, layer in sara.layers().items():
        torch.testing.assert_close(layer.values.grad, dense[name].grad.flatten()[layer.index])
    assert all(p.grad is None for n, p in sara.model.named_parameters() if not n.endswith(".values"))


# --- the update ------------------------------------------------------------------------------------------------------


def test_sara_adamw_is_adamw_on_the_selected_entries():
    torch.manual_seed(0)
    values = torch.nn.Parameter(torch.randn(50))
    twin = torch.nn.Parameter(values.detach().clone())
    ours = SaRAAdamW([values], lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.1)
    for step in range(5):
        grad = torch.randn(50, generator=torch.Generator().manual_seed(step))
        values.grad, twin.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(values.detach(), twin.detach())


def test_reselection_keeps_the_still_small_entries_resets_moments_and_freezes_the_rest():
    values = torch.nn.Parameter(torch.tensor([0.001, 0.5, -0.002, 0.6]))
    optimizer = SaRAAdamW([values], lr=0.1, weight_decay=0.5)
    values.grad = torch.ones(4)
    optimizer.step()
    optimizer.reselect(threshold=0.2)
    state = optimizer.state[values]
    assert state["active"].tolist() == [True, False, True, False]
    assert len(state["exp_avg"]) == 2 and state["exp_avg"].abs().sum() == 0 and int(state["step"]) == 0
    frozen = values.detach()[[1, 3]].clone()
    values.grad = torch.ones(4)
    optimizer.step()
    assert torch.equal(values.detach()[[1, 3]], frozen)  # no Adam step and no weight decay on frozen entries


def test_the_optimizer_state_resumes_with_its_active_entries():
    values = torch.nn.Parameter(torch.tensor([0.001, 0.5, -0.002, 0.6]))
    optimizer = SaRAAdamW([values], lr=0.1)
    values.grad = torch.ones(4)
    optimizer.step()
    optimizer.reselect(0.2)
    saved = copy.deepcopy(optimizer.state_dict())
    restored = SaRAAdamW([values], lr=0.1)
    restored.load_state_dict(saved)
    assert restored.active(values).dtype == torch.bool
    assert restored.active(values).tolist() == [True, False, True, False]


def test_the_low_rank_loss_is_the_nuclear_norm_of_the_masked_matrix_and_reaches_the_values():
    unet = tiny_unet()
    sara = prepare(unet, SaRAConfig(threshold=THRESHOLD))
    name, layer = next((n, la) for n, la in sara.layers().items() if len(la.shape) == 2 and min(la.shape) > 8)
    active = torch.ones(len(layer.values), dtype=torch.bool)
    active[::2] = False
    loss = rank_loss(layer, active)
    masked = torch.zeros(layer.shape.numel())
    masked[layer.index[active]] = layer.values.detach()[active]
    torch.testing.assert_close(loss, torch.linalg.matrix_norm(masked.view(layer.shape), "nuc"))
    loss.backward()
    assert layer.values.grad[active].abs().sum() > 0 and layer.values.grad[~active].abs().sum() == 0


# --- the delta file --------------------------------------------------------------------------------------------------


def trained_sara(seed: int = 0):
    """A prepared tiny UNet whose values took a few optimizer steps on a random objective."""
    sara = prepare(tiny_unet(seed), SaRAConfig(threshold=THRESHOLD))
    optimizer = SaRAAdamW([p for p in sara.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        sara(*unet_inputs()).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return sara


def test_a_saved_delta_merges_into_a_plain_unet_and_unmerges_exactly(tmp_path):
    sara = trained_sara()
    trained = output(sara.model)
    path = sara.save_pretrained(tmp_path)
    assert path.name == DELTA_FILE
    base = tiny_unet()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    merge(base, path)
    torch.testing.assert_close(output(base), trained, rtol=0, atol=0)
    unmerge(base, path)
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())
    merge(base, path, alpha=0.0)
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())


def test_alpha_scales_the_delta_and_two_deltas_combine_with_weights(tmp_path):
    first, second = trained_sara(), trained_sara()
    with torch.no_grad():  # a second, different update of the same base
        for layer in second.layers().values():
            layer.values.add_(0.001)
    a, b = first.delta(), second.delta()
    combined = SaRADelta.combine([(a, 0.6), (b, 0.6)])
    for name in a.index:
        torch.testing.assert_close(combined.delta(name), 0.6 * a.delta(name) + 0.6 * b.delta(name))
    base = tiny_unet()
    merge(base, a, alpha=0.5)
    weights = dict(base.named_parameters())
    name = next(iter(a.index))
    want = (a.base[name].float() + 0.5 * a.delta(name)).to(weights[name].dtype)
    assert torch.equal(weights[name].detach().flatten()[a.index[name]], want)
    with pytest.raises(ValueError, match="alpha must be in"):
        merge(tiny_unet(), a, alpha=3.0)


def test_a_delta_is_refused_on_another_base_and_a_damaged_file_is_named(tmp_path):
    path = trained_sara().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained on another base model"):
        merge(tiny_unet(seed=1), path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".values"))
    tensors[key][0] = float("nan")
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"format": "genreg-sara-1", "settings": "{}"})
    with pytest.raises(ValueError, match="NaN or infinite"):
        SaRADelta.load(tmp_path / "bad.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="is not a SaRA delta"):
        SaRADelta.load(tmp_path / "other.safetensors")


def test_a_delta_trained_in_fp32_applies_to_the_fp16_base():
    sara = trained_sara()
    half = tiny_unet().half()
    merge(half, sara.delta())
    trained = sara.merge_and_unload().state_dict()
    for name, p in half.state_dict().items():
        assert torch.equal(p, trained[name].half()), name


def test_merge_and_unload_gives_a_plain_unet_that_diffusers_loads(tmp_path):
    sara = trained_sara()
    trained = output(sara.model)
    unet = sara.merge_and_unload()
    assert not any("parametrizations" in n for n, _ in unet.named_parameters())
    unet.save_pretrained(tmp_path / "unet")
    torch.testing.assert_close(output(UNet2DConditionModel.from_pretrained(tmp_path / "unet")), trained)
    fresh = prepare(tiny_unet(), SaRAConfig(threshold=THRESHOLD))
    with torch.no_grad():
        for layer in fresh.layers().values():
            layer.values.add_(1.0)
    restored, original = fresh.unload().state_dict(), tiny_unet().state_dict()
    assert restored.keys() == original.keys() and all(torch.equal(restored[k], original[k]) for k in original)


# --- the trainer -----------------------------------------------------------------------------------------------------


@pytest.fixture
def concept_dir(tmp_path) -> Path:
    root = tmp_path / "concept"
    root.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 120, 200)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a checkered circle number {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def pipe() -> StableDiffusionPipeline:
    p = StableDiffusionPipeline(**tiny_sd_components(0))
    p.set_progress_bar_config(disable=True)
    return p


def config(concept_dir, **changes) -> SaRATrainingConfig:
    settings = {"train_data_dir": str(concept_dir), "threshold": THRESHOLD, "rank_min_dim": 8}
    return SaRATrainingConfig(**(settings | changes))


def train(tmp_path, name="out", **changes) -> TrainConfig:
    defaults = {
        "max_train_steps": 4,
        "train_batch_size": 2,
        "checkpointing_steps": 1,
        "report_to": "none",
        "learning_rate": 1e-2,
    }
    return TrainConfig(output_dir=str(tmp_path / name), **(defaults | changes))


def test_training_writes_a_delta_that_a_plain_pipeline_loads_and_leaves_the_model_as_it_was(tmp_path, concept_dir):
    trained, base = pipe(), output(pipe().unet)
    path = train_sara(trained, config(concept_dir), train(tmp_path))
    assert path.is_file() and (tmp_path / "out" / "checkpoint-2" / DELTA_FILE).is_file()
    assert not any("parametrizations" in n for n, _ in trained.unet.named_parameters())
    torch.testing.assert_close(output(trained.unet), base, rtol=0, atol=0)
    with merged(trained.unet, path):
        after = output(trained.unet)
    torch.testing.assert_close(output(load_into(pipe(), path).unet), after, rtol=0, atol=0)
    assert not torch.equal(after, base)
    torch.testing.assert_close(output(trained.unet), base, rtol=0, atol=0)


def test_resume_across_the_reselection_equals_the_uninterrupted_run(tmp_path, concept_dir):
    """Re-selection at step 2 of 4, the run stopped after step 3 and resumed: the delta is bit-identical."""
    full = train_sara(pipe(), config(concept_dir), train(tmp_path, "full"))
    stopped = {"n": 0}

    def stop_after_three() -> bool:
        stopped["n"] += 1
        return stopped["n"] == 3

    train_sara(pipe(), config(concept_dir), train(tmp_path, "split"), should_stop=stop_after_three)
    resumed = train_sara(pipe(), config(concept_dir), train(tmp_path, "split", resume_from_checkpoint="latest"))
    a, b = SaRADelta.load(full), SaRADelta.load(resumed)
    assert all(torch.equal(a.values[n], b.values[n]) for n in a.values)
    with pytest.raises(ValueError, match="threshold"):
        train_sara(
            pipe(), config(concept_dir, threshold=0.03), train(tmp_path, "split", resume_from_checkpoint="latest")
        )


def test_the_low_rank_loss_and_the_reselection_change_the_update(tmp_path, concept_dir):
    plain = SaRADelta.load(
        train_sara(pipe(), config(concept_dir, lambda_rank=0.0, progressive_fraction=0.0), train(tmp_path, "a"))
    )
    ranked = SaRADelta.load(
        train_sara(pipe(), config(concept_dir, lambda_rank=1.0, progressive_fraction=0.0), train(tmp_path, "b"))
    )
    progressive = SaRADelta.load(train_sara(pipe(), config(concept_dir, lambda_rank=0.0), train(tmp_path, "c")))
    assert any(not torch.equal(plain.values[n], ranked.values[n]) for n in plain.values)
    assert any(not torch.equal(plain.values[n], progressive.values[n]) for n in plain.values)


def test_the_learning_rate_follows_the_threshold_unless_given(tmp_path, concept_dir, monkeypatch):
    assert math.isclose(auto_learning_rate(2e-3), 1e-3 * math.exp(-0.7))
    seen = []
    real = SaRAAdamW.__init__

    def spy(self, params, lr, **kwargs):
        seen.append(lr)
        real(self, params, lr, **kwargs)

    monkeypatch.setattr(SaRAAdamW, "__init__", spy)
    train_sara(pipe(), config(concept_dir), train(tmp_path, "auto", learning_rate=None, max_train_steps=1))
    assert seen == [pytest.approx(auto_learning_rate(THRESHOLD))]


def test_uncaptioned_images_and_empty_folders_are_refused_before_any_work(tmp_path, concept_dir):
    (concept_dir / "metadata.jsonl").unlink()
    with pytest.raises(ValueError, match="4 of 4 images .* have no caption"):
        train_sara(pipe(), config(concept_dir), train(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images in"):
        train_sara(pipe(), config(empty), train(tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.fixture
def saved_model(tmp_path) -> Path:
    pipe().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def flags(model: Path, concept_dir: Path, out: Path, *extra: str) -> list[str]:
    """The training flags every command-line test shares, then ``extra``."""
    return [
        *("--pretrained_model_name_or_path", str(model), "--train_data_dir", str(concept_dir)),
        *("--threshold", str(THRESHOLD), "--rank_min_dim", "8", "--report_to", "none", "--output_dir", str(out)),
        *extra,
    ]


def test_genreg_train_sara_runs_from_the_command_line(tmp_path, concept_dir, saved_model, capsys):
    steps = ("--max_train_steps", "2", "--train_batch_size", "2")
    assert main(["train", "sara", *flags(saved_model, concept_dir, tmp_path / "cli", *steps)]) == 0
    assert (tmp_path / "cli" / DELTA_FILE).is_file()
    bad = flags(saved_model, concept_dir, tmp_path / "bad", *steps, "--threshold", "0")
    assert main(["train", "sara", *bad]) == 2
    assert "threshold must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_cpu_processes_reach_the_single_process_delta(tmp_path, concept_dir, saved_model):
    """2 processes x batch 2 == 1 process x batch 4, re-selection and the low-rank loss included."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    script = str(ROOT / "scripts" / "train_sara.py")
    # Adam's first step is lr * sign(g): with a tiny epsilon, entries whose gradient is ~0 would move by +-lr on
    # reduction-order noise; a larger one keeps the update smooth in g.
    common = ("--max_train_steps", "4", "--learning_rate", "0.01", "--flip_p", "0", "--adam_epsilon", "1e-2")
    one = flags(saved_model, concept_dir, tmp_path / "one", *common, "--train_batch_size", "4")
    two = flags(saved_model, concept_dir, tmp_path / "two", *common, "--train_batch_size", "2")
    subprocess.run([sys.executable, script, *one], check=True, env=env, capture_output=True)
    torchrun = ["torchrun", "--nproc_per_node", "2", "--master_port", "29573", script, *two]
    subprocess.run(torchrun, check=True, env=env, capture_output=True)
    a, b = SaRADelta.load(tmp_path / "one" / DELTA_FILE), SaRADelta.load(tmp_path / "two" / DELTA_FILE)
    assert max(float(a.delta(n).abs().max()) for n in a.values) > 1e-2  # it trained (4 steps of lr 0.01)
    for name in a.values:
        torch.testing.assert_close(a.values[name], b.values[name], atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_equals_the_whole_batch(tmp_path, concept_dir):
    common = {"max_train_steps": 2, "checkpointing_steps": 0, "adam_epsilon": 1e-2}
    whole = train_sara(pipe(), config(concept_dir, flip_p=0.0), train(tmp_path, "whole", train_batch_size=4, **common))
    accumulated = train_sara(
        pipe(),
        config(concept_dir, flip_p=0.0),
        train(tmp_path, "acc", train_batch_size=2, gradient_accumulation_steps=2, **common),
    )
    a, b = SaRADelta.load(whole), SaRADelta.load(accumulated)
    for name in a.values:
        torch.testing.assert_close(a.values[name], b.values[name], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_trains_fp32_values(tmp_path, concept_dir, saved_model):
    """accelerate's mixed precision is fixed per process, so this run gets its own."""
    argv = flags(saved_model, concept_dir, tmp_path / "bf16", "--max_train_steps", "2", "--mixed_precision", "bf16")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_sara.py"), *argv], check=True, capture_output=True)
    delta = SaRADelta.load(tmp_path / "bf16" / DELTA_FILE)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in delta.values.values())
    assert any(not torch.equal(delta.values[n], delta.base[n].float()) for n in delta.values)


def test_a_failed_run_leaves_the_unet_as_it_was(tmp_path, concept_dir):
    trained, before = pipe(), output(pipe().unet)

    def fail() -> bool:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        train_sara(trained, config(concept_dir), train(tmp_path), should_stop=fail)
    assert not any("parametrizations" in n for n, _ in trained.unet.named_parameters())
    torch.testing.assert_close(output(trained.unet), before, rtol=0, atol=0)

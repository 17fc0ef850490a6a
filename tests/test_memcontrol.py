"""MemControl: the block mask and its adapters, the study in RDB storage (resumed, shared, refused when it cannot be
used) and the Pareto front it writes, on tiny components."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from genreg.cli import main
from genreg.methods.memcontrol import (
    MemControlConfig,
    MemControlFinetuneConfig,
    TrialStopped,
    add_adapter,
    applied,
    attention_blocks,
    choose,
    finetune_memcontrol,
    knee,
    pareto_front,
    parse_mask,
    search_memcontrol,
)
from genreg.testing import tiny_sd_components
from genreg.training import TrainConfig


def pipe() -> StableDiffusionPipeline:
    p = StableDiffusionPipeline(**tiny_sd_components(0))
    p.set_progress_bar_config(disable=True)
    return p


def captioned(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a red circle number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    return folder


def mean_colour(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).mean((0, 1)) for im in images])


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    return captioned(tmp_path / "train", 4, 0), captioned(tmp_path / "held", 4, 1)


def settings(folders, **changes) -> MemControlConfig:
    train, held = folders
    return MemControlConfig(train_data_dir=str(train), validation_data_dir=str(held), **({"n_trials": 2} | changes))


def run(tmp_path, **changes) -> TrainConfig:
    defaults = {"max_train_steps": 1, "train_batch_size": 2, "report_to": "none", "output_dir": str(tmp_path / "out")}
    return TrainConfig(**(defaults | changes))


def test_the_mask_selects_blocks_and_only_their_projections_train():
    unet = pipe().unet
    blocks = attention_blocks(unet)
    assert blocks and all(".attentions." in b for b in blocks)
    mask = [1] + [0] * (len(blocks) - 1)
    trainable = add_adapter(unet, mask)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable == sum(p.numel() for p in unet.parameters() if p.requires_grad) > 0
    assert all(n.startswith(blocks[0] + ".") and "lora" in n and ".attn" in n for n in names)
    ia3 = pipe().unet
    add_adapter(ia3, [1] * len(blocks), family="ia3")
    assert any("ff.net.2" in n for n, p in ia3.named_parameters() if p.requires_grad)


def test_lora_on_the_feed_forward_layers_adds_them_to_the_projections():
    blocks = attention_blocks(pipe().unet)
    both, projections = pipe().unet, pipe().unet
    wider = add_adapter(both, [1] * len(blocks), modules="attention+ff")
    assert wider > add_adapter(projections, [1] * len(blocks), modules="attention")
    trained = {n.split(".lora_")[0] for n, p in both.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in trained} == {"to_q", "to_k", "to_v", "0", "proj", "2"}
    assert any(n.endswith("ff.net.0.proj") for n in trained) and any(n.endswith("ff.net.2") for n in trained)
    with pytest.raises(ValueError, match="unknown LoRA modules 'all'; choose one of attention, attention"):
        add_adapter(pipe().unet, [1] * len(blocks), modules="all")


@pytest.mark.parametrize(
    "mask, message", [("empty", "selects no block"), ("short", "the mask has 1 bits"), ("two", "0s and 1s")]
)
def test_bad_masks_are_refused(mask, message):
    unet = pipe().unet
    n = len(attention_blocks(unet))
    bits = {"empty": [0] * n, "short": [1], "two": [2] * n}[mask]
    with pytest.raises(ValueError, match=message):
        add_adapter(unet, bits)


def test_the_pareto_front_keeps_the_undominated_points():
    points = [(1.0, 5.0), (2.0, 2.0), (3.0, 3.0), (4.0, 1.0), (2.0, 2.0)]
    assert pareto_front(points) == [0, 1, 3, 4]


def test_a_search_fills_a_study_that_a_second_run_resumes_and_writes_the_front(tmp_path, folders):
    config, train = settings(folders, sampler="random"), run(tmp_path)
    path = search_memcontrol(pipe(), config, train, embed=mean_colour)
    front = json.loads(path.read_text())
    first = len(front["trials"])  # an empty mask is pruned, not scored
    assert 0 < first <= 2 and (tmp_path / "out" / "pareto.png").is_file()
    search_memcontrol(pipe(), config, train, embed=mean_colour)  # a second worker, or a resumed run, adds trials
    rows = json.loads(path.read_text())["trials"]
    assert len(rows) > first and any(r["pareto"] for r in rows)
    assert len({(tuple(r["mask"]), r["learning_rate"]) for r in rows}) == len(rows)  # it went on, not over again
    for r in rows:
        assert len(r["mask"]) == len(front["blocks"]) and any(r["mask"]) and 0 < r["trainable_fraction"] < 1
        assert np.isfinite(r["memorization"]) and np.isfinite(r["frechet_distance"])


def test_a_storage_that_cannot_be_opened_or_a_study_of_other_objectives_is_refused(tmp_path, folders):
    import optuna

    from genreg.methods.memcontrol import search

    with pytest.raises(ValueError, match="cannot open the study storage"):
        search_memcontrol(pipe(), settings(folders, storage="nosuchdb://x"), run(tmp_path), embed=mean_colour)
    url = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="memcontrol", storage=url, direction="maximize")
    with pytest.raises(ValueError, match="was created with other objectives"):
        search_memcontrol(pipe(), settings(folders, storage=url), run(tmp_path), embed=mean_colour)
    url = f"sqlite:///{tmp_path / 'lora.db'}"
    search.open_study(settings(folders, storage=url), tmp_path, seed=0)
    with pytest.raises(ValueError, match="holds trials of"):
        search.open_study(settings(folders, storage=url, family="ia3"), tmp_path, seed=0)
    with pytest.raises(ValueError, match="holds trials of"):
        search.open_study(settings(folders, storage=url, lora_modules="attention"), tmp_path, seed=0)
    search.open_study(settings(folders, storage=url), tmp_path, seed=0)  # the same setup adds trials


def test_genreg_search_memcontrol_refuses_a_missing_held_out_set(tmp_path, folders, capsys):
    argv = ["search", "memcontrol", "--train_data_dir", str(folders[0]), "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "validation_data_dir is empty" in capsys.readouterr().err


def test_masks_parse_from_bits_and_the_knee_balances_both_objectives(tmp_path):
    assert parse_mask("0110") == parse_mask("0, 1, 1, 0") == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="0s and 1s"):
        parse_mask("0,2,1")
    objectives = [(1.0, 9.0, True), (3.0, 2.0, True), (9.0, 1.0, True), (9.0, 9.0, False)]
    rows = [
        {"trial": k, "memorization": m, "frechet_distance": f, "pareto": front, "mask": [1, k % 2], "learning_rate": k}
        for k, (m, f, front) in enumerate(objectives)
    ]
    assert knee([r for r in rows if r["pareto"]])["trial"] == 1
    path = tmp_path / "pareto.json"
    path.write_text(json.dumps({"blocks": ["a", "b"], "trials": rows}))
    assert choose(path)["trial"] == 1 and choose(path, trial=3)["mask"] == [1, 1]
    with pytest.raises(ValueError, match="no finished trial 7"):
        choose(path, trial=7)
    searched = {"family": "lora", "lora_rank": 4, "lora_modules": "attention+ff"}
    path.write_text(json.dumps({"blocks": ["a", "b"], "setup": searched | {"reduce": "max"}, "trials": rows}))
    assert choose(path, adapter=searched)["trial"] == 1
    with pytest.raises(ValueError, match="another adapter: pass --lora_rank 4 --lora_modules attention\\+ff to"):
        choose(path, adapter={"family": "lora", "lora_rank": 8, "lora_modules": "attention"})


@pytest.mark.parametrize("family", ["lora", "ia3"])
def test_stage_two_trains_the_masked_blocks_and_its_result_loads_and_applies_exactly(tmp_path, folders, family):
    base = pipe()
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    bits = ",".join(["1"] + ["0"] * (len(attention_blocks(base.unet)) - 1))
    config = MemControlFinetuneConfig(train_data_dir=str(folders[0]), mask=bits, family=family)
    result = finetune_memcontrol(base, config, run(tmp_path, max_train_steps=3, learning_rate=0.05))
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in before.items())  # the base is untouched
    g = torch.Generator().manual_seed(0)
    plain = base("a red circle", num_inference_steps=2, generator=g, output_type="np").images
    base.unet.requires_grad_(True)
    with applied(base.unet, result, alpha=1.0):
        tuned = base("a red circle", num_inference_steps=2, generator=g.manual_seed(0), output_type="np").images
    assert np.abs(tuned - plain).max() > 1e-4  # the result changes the model
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in before.items())  # and is removed after
    assert all(p.requires_grad for p in base.unet.parameters())
    loaded = pipe()  # the standard loaders
    if family == "lora":
        loaded.load_lora_weights(str(result.parent))
    else:
        loaded.unet = type(loaded.unet).from_pretrained(result)
    again = loaded("a red circle", num_inference_steps=2, generator=g.manual_seed(0), output_type="np").images
    np.testing.assert_allclose(again, tuned, atol=1e-5)


@pytest.mark.parametrize("family", ["lora", "ia3"])
def test_adapters_on_a_half_precision_unet_train_in_float32(family):
    unet = pipe().unet.to(torch.float16)
    add_adapter(unet, [1] * len(attention_blocks(unet)), family)
    trained = [p for p in unet.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # what fp16 mixed precision's scaler needs
    assert all(p.dtype == torch.float16 for p in unet.parameters() if not p.requires_grad)


def test_stage_two_takes_the_knee_of_a_search_and_refuses_a_mask_and_a_front_together(tmp_path, folders):
    path = search_memcontrol(pipe(), settings(folders, sampler="random"), run(tmp_path), embed=mean_colour)
    config = MemControlFinetuneConfig(train_data_dir=str(folders[0]), pareto=str(path))
    mask, lr = config.resolve()
    row = choose(path)
    assert mask == row["mask"] and lr == row["learning_rate"] and row["pareto"]
    with pytest.raises(ValueError, match="either --pareto"):
        MemControlFinetuneConfig(train_data_dir=str(folders[0]), pareto=str(path), mask="1")
    with pytest.raises(ValueError, match="either --pareto"):
        MemControlFinetuneConfig(train_data_dir=str(folders[0]))


def test_a_trial_whose_worker_died_is_failed_and_queued_again(tmp_path, folders, monkeypatch):
    import optuna

    from genreg.methods.memcontrol import search

    monkeypatch.setattr(search, "HEARTBEAT_SECONDS", 1)
    config = settings(folders, sampler="random")
    study = search.open_study(config, tmp_path / "out", seed=0)
    dead = study.ask()  # a worker took a trial and died: no more heartbeats
    dead.suggest_float("learning_rate", 1e-5, 1e-3, log=True)
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    search_memcontrol(pipe(), config, run(tmp_path), embed=mean_colour)
    states = [t.state for t in optuna.load_study(study_name="memcontrol", storage=study._storage).trials]
    assert states[0] == optuna.trial.TrialState.FAIL and optuna.trial.TrialState.COMPLETE in states


@pytest.mark.parametrize("stop_at_call", [1, 2], ids=["while-training", "while-scoring"])
def test_a_stop_during_a_trial_fails_it_rather_than_scoring_it(tmp_path, folders, stop_at_call):
    import optuna

    calls = []

    def should_stop() -> bool:  # asked after the one training step, then after every sampling step
        calls.append(1)
        return len(calls) >= stop_at_call

    config = settings(folders, sampler="random")
    with pytest.raises(TrialStopped, match="scoring" if stop_at_call == 2 else "step 1 of 1"):
        search_memcontrol(pipe(), config, run(tmp_path), embed=mean_colour, should_stop=should_stop)
    assert len(calls) == stop_at_call  # nothing sampled after a stop
    *pruned, trial = optuna.load_study(
        study_name="memcontrol", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    ).trials
    assert trial.state == optuna.trial.TrialState.FAIL  # an empty mask is pruned before it, if drawn
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in pruned)


def test_the_memorization_kit_repeats_some_images_and_names_no_detail(tmp_path):
    from genreg.tinyworld.concepts import read_kit_scenes, write_memorization_kit

    kit = write_memorization_kit(tmp_path / "kit", "cyan", unique=3, repeated=2, copies=4)
    assert len(list(kit.glob("*.png"))) == 3 + 2 * 4
    rows = read_kit_scenes(kit)
    assert [r for _, _, r in rows] == [False] * 3 + [True] * 2
    assert len({c for c, _, _ in rows}) == 5  # every distinct image has its own caption
    for caption, scene, _ in rows:
        assert scene.objects[0].color == "cyan" and "cyan" in caption
        assert not any(w in caption.split() for w in ("small", "large", "white", "black", "striped", "dotted"))


def test_the_accuracy_objective_scores_the_held_out_captions_and_a_study_keeps_its_objectives(tmp_path, folders):
    seen = []

    def scorer(images, prompts) -> float:
        seen.append(list(prompts))
        return 0.25

    config = settings(folders, sampler="random", quality="accuracy")
    path = search_memcontrol(pipe(), config, run(tmp_path), scorer=scorer)
    rows = json.loads(path.read_text())["trials"]
    assert rows and all(r["error_rate"] == 0.75 and "frechet_distance" not in r for r in rows)
    assert seen[0] == [f"a red circle number {i}" for i in range(4)]  # the held-out captions
    assert knee(rows)["trial"] in {r["trial"] for r in rows}
    with pytest.raises(ValueError, match="was created with other objectives"):
        search_memcontrol(pipe(), settings(folders, sampler="random"), run(tmp_path), embed=mean_colour)

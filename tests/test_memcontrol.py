"""MemControl: the block mask and its adapters, the study in RDB storage (resumed, shared, refused when it cannot be
used) and the Pareto front it writes, on tiny components."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from genreg.cli import main
from genreg.methods.memcontrol import (
    MemControlConfig,
    add_adapter,
    attention_blocks,
    pareto_front,
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
    return MemControlConfig(train_data_dir=str(train), validation_data_dir=str(held), n_trials=2, **changes)


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

    with pytest.raises(ValueError, match="cannot open the study storage"):
        search_memcontrol(pipe(), settings(folders, storage="nosuchdb://x"), run(tmp_path), embed=mean_colour)
    url = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="memcontrol", storage=url, direction="maximize")
    with pytest.raises(ValueError, match="was created with other objectives"):
        search_memcontrol(pipe(), settings(folders, storage=url), run(tmp_path), embed=mean_colour)


def test_genreg_search_memcontrol_refuses_a_missing_held_out_set(tmp_path, folders, capsys):
    argv = ["search", "memcontrol", "--train_data_dir", str(folders[0]), "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "validation_data_dir is empty" in capsys.readouterr().err

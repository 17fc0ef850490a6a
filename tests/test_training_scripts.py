"""The trainer entry points: `genreg train`, the scripts' flags, and data parallelism over CPU processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from genreg.cli import main
from genreg.embeddings import EMBEDS_FILE, load_learned_embeds
from genreg.testing import tiny_sd_components

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    StableDiffusionPipeline(**tiny_sd_components(0)).save_pretrained(path)
    return path


@pytest.fixture
def subject_dir(tmp_path) -> Path:
    root = tmp_path / "subject"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (50 * i, 100, 200)).save(root / f"{i}.png")
    return root


def flags(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--placeholder_token",
        "<me>",
        "--reference_words",
        "red circle",
        "blue square",
        "--output_dir",
        str(out),
        "--checkpointing_steps",
        "2",
        "--report_to",
        "none",
        *extra,
    ]


def test_genreg_train_cross_init_writes_a_loadable_embedding(tiny_model, subject_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "cross-init", *flags(tiny_model, subject_dir, out, "--max_train_steps", "3")]
    assert main(argv) == 0
    assert "learned_embeds.safetensors" in capsys.readouterr().out
    assert (out / "checkpoint-2" / EMBEDS_FILE).is_file() and (out / "checkpoint-3").is_dir()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_textual_inversion(str(out))
    assert pipe.tokenizer.convert_tokens_to_ids(["<me>", "<me>_1"]) == [
        len(pipe.tokenizer) - 2,
        len(pipe.tokenizer) - 1,
    ]


def test_genreg_train_reports_bad_input(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "cross-init", *flags(tiny_model, empty, tmp_path / "out")]) == 2
    assert "no images in" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_cpu_processes_reach_the_single_process_embedding(tiny_model, subject_dir, tmp_path):
    """2 processes x batch 2 == 1 process x batch 4: same samples, gradients averaged by DDP (gloo)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    script = str(ROOT / "scripts" / "train_cross_init.py")
    common = ("--max_train_steps", "4", "--learning_rate", "0.05")
    one = flags(tiny_model, subject_dir, tmp_path / "one", "--train_batch_size", "4", *common)
    two = flags(tiny_model, subject_dir, tmp_path / "two", "--train_batch_size", "2", *common)
    subprocess.run([sys.executable, script, *one], check=True, env=env, capture_output=True)
    subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", "29571", script, *two],
        check=True,
        env=env,
        capture_output=True,
    )
    a = load_learned_embeds(tmp_path / "one" / EMBEDS_FILE)[1]
    b = load_learned_embeds(tmp_path / "two" / EMBEDS_FILE)[1]
    init = load_learned_embeds(tmp_path / "one" / "initial_embeds.safetensors")[1]
    assert (a - init).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

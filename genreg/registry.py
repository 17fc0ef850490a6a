"""The methods genreg serves, by name: the `genreg` command and the app are generated from this table."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import add_arguments, from_namespace
from .personalization import CrossInitConfig, TextualInversionConfig, train_cross_init, train_textual_inversion
from .training import TrainConfig, process_state


@dataclass(frozen=True)
class Trainer:
    """A training method: its config dataclass, the function that runs it, and its defaults over TrainConfig's."""

    config: type
    run: Callable[..., Path]
    help: str
    train_defaults: dict


TRAINERS: dict[str, Trainer] = {
    "cross-init": Trainer(
        CrossInitConfig,
        train_cross_init,
        "Cross Initialization: a token embedding initialised from the text encoder's output (CVPR 2024)",
        {"max_train_steps": 320, "learning_rate": 5e-3, "train_batch_size": 8},
    ),
    "textual-inversion": Trainer(
        TextualInversionConfig,
        train_textual_inversion,
        "Textual Inversion: a token embedding learnt from a few images (the baseline)",
        {"max_train_steps": 1000, "learning_rate": 5e-3, "train_batch_size": 8},
    ),
}

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": None}


def add_trainer_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Flags of trainer ``name``: the model, the method's config and the shared training settings."""
    trainer = TRAINERS[name]
    parser.add_argument(
        "--pretrained_model_name_or_path", default="tinyworld", help="'tinyworld', a diffusers directory or hub id"
    )
    add_arguments(parser, trainer.config)
    add_arguments(parser, TrainConfig)
    parser.set_defaults(**trainer.train_defaults)


def run_trainer(name: str, args: argparse.Namespace) -> Path:
    """Builds the configs from parsed flags, loads the model on this process's device, and trains."""
    from .models import load_pipeline

    trainer = TRAINERS[name]
    config = from_namespace(trainer.config, args)
    train = from_namespace(TrainConfig, args)
    # Frozen weights in the autocast precision (as diffusers' scripts do); trained vectors stay in float32.
    pipe = load_pipeline(
        args.pretrained_model_name_or_path,
        device=str(process_state().device),
        dtype=_DTYPES[train.mixed_precision] or torch.float32,
    )
    pipe.set_progress_bar_config(disable=True)
    return trainer.run(pipe, config, train)


def trainer_main(name: str, argv: list[str] | None = None) -> None:
    """Entry point of ``scripts/train_<name>.py`` (runs under ``accelerate launch`` or ``torchrun``)."""
    parser = argparse.ArgumentParser(description=TRAINERS[name].help)
    add_trainer_arguments(parser, name)
    path = run_trainer(name, parser.parse_args(argv))
    print(f"wrote {path}")

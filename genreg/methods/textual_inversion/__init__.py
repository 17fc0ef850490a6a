"""Textual Inversion (Gal et al. 2022, Eq. 2), the baseline: v* = argmin_v E ||eps - eps(z_t, t, E(y(v)))||^2."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import option
from ...embeddings import EmbeddingConfig, PlaceholderVectors, initializer_vectors, single_token_id, train_embedding
from ...registry import Method, register
from ...training import TrainConfig


@dataclass
class TextualInversionConfig(EmbeddingConfig):
    initializer_token: str = option("object", "a single-token word whose embedding every vector starts from")


def train_textual_inversion(pipe, config: TextualInversionConfig, train: TrainConfig, **fit_kwargs) -> Path:
    """Trains a textual-inversion embedding on ``pipe``; returns the ``learned_embeds.safetensors`` path."""
    single_token_id(pipe.tokenizer, config.initializer_token)  # fail before any work

    def init(placeholder: PlaceholderVectors) -> torch.Tensor:
        return initializer_vectors(pipe.text_encoder, pipe.tokenizer, config.initializer_token, config.num_vectors)

    return train_embedding(pipe, config, train, init, **fit_kwargs)


METHOD = register(
    Method(
        name="textual-inversion",
        kind="trainer",
        title="Textual Inversion",
        help="learn a subject's token embedding from a few images, started from a word's embedding"
        " (Gal et al. 2022; the baseline)",
        config=TextualInversionConfig,
        run=train_textual_inversion,
        train_defaults={"max_train_steps": 1000, "learning_rate": 5e-3, "train_batch_size": 8},
    )
)

__all__ = ["METHOD", "TextualInversionConfig", "initializer_vectors", "single_token_id", "train_textual_inversion"]

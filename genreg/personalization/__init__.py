"""Personalization: learned token embeddings (textual inversion, Cross Initialization) and their shared trainer."""

from .cross_init import REFERENCE_WORDS, CrossInitConfig, train_cross_init
from .embeddings import (
    EMBEDS_FILE,
    INIT_FILE,
    EmbeddingConfig,
    add_placeholder,
    load_learned_embeds,
    placeholder_names,
    save_learned_embeds,
)
from .textual_inversion import TextualInversionConfig, train_textual_inversion

__all__ = [
    "EMBEDS_FILE",
    "INIT_FILE",
    "REFERENCE_WORDS",
    "CrossInitConfig",
    "EmbeddingConfig",
    "TextualInversionConfig",
    "add_placeholder",
    "load_learned_embeds",
    "placeholder_names",
    "save_learned_embeds",
    "train_cross_init",
    "train_textual_inversion",
]

"""CoRe (Wu et al., AAAI 2025): a token learnt with its context regularized toward the category word's, in
embeddings (Eq. 3) and cross-attention (Eq. 4), the norm held mid-run (Eq. 6); then optionally the UNet with the token
frozen (stage 2), and test-time optimization for one prompt.

Stage 1 writes ``learned_embeds.safetensors`` (``pipe.load_textual_inversion``); stage 2 a diffusers ``unet/``
folder (``UNet2DConditionModel.from_pretrained(out, subfolder="unet")``) or, with ``--unet_lora_rank``, LoRA weights
(``pipe.load_lora_weights(out)``). Token ids come from the tokenizer, never from fixed numbers.
"""

from __future__ import annotations

from ...registry import Method, register
from .config import PROMPT_SETS, CoReConfig, check_context, read_prompt_file, tinyworld_contexts
from .regularizers import (
    context_attention_loss,
    context_embedding_loss,
    context_positions,
    rescale_to,
    token_attention,
)
from .trainer import Contexts, CoReObjective, train_core, train_token, tune_for_prompt, tune_unet

METHOD = register(
    Method(
        name="core",
        kind="trainer",
        title="CoRe",
        help="learn a subject's token with its context kept as the category word's, in text embeddings and "
        "cross-attention; then optionally the UNet (Wu et al., AAAI 2025)",
        config=CoReConfig,
        run=train_core,
        train_defaults={"max_train_steps": 300, "learning_rate": 5e-3, "train_batch_size": 6},
    )
)

__all__ = [
    "METHOD",
    "PROMPT_SETS",
    "CoReConfig",
    "CoReObjective",
    "Contexts",
    "check_context",
    "context_attention_loss",
    "context_embedding_loss",
    "context_positions",
    "read_prompt_file",
    "rescale_to",
    "tune_for_prompt",
    "tinyworld_contexts",
    "token_attention",
    "train_core",
    "train_token",
    "tune_unet",
]

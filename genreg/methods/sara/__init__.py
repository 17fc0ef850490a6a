"""SaRA (Hu et al., ICLR 2025): fine-tune the weights whose magnitude is below a threshold, as sparse 1-D leaves.

sara = genreg.methods.sara.prepare(unet, SaRAConfig(threshold=2e-3))   # train sara's parameters
sara.save_pretrained("out")                                              # out/sara_delta.safetensors
genreg.methods.sara.load_into(pipe, "out/sara_delta.safetensors", alpha=1.0)   # a plain diffusers pipeline
"""

from __future__ import annotations

from ...registry import Method, register
from .optim import SaRAAdamW, eligible_for_rank_loss, rank_loss
from .sparse import (
    DELTA_FILE,
    SaRAConfig,
    SaRADelta,
    SaRAModel,
    SparseValues,
    auto_learning_rate,
    load_into,
    merge,
    merged,
    prepare,
    select,
    sparse_layers,
    unmerge,
)
from .trainer import SaRATrainingConfig, train_sara

METHOD = register(
    Method(
        name="sara",
        kind="finetuner",
        title="SaRA",
        help="fine-tune the UNet's small weights as a sparse update, no adapter at inference (Hu et al., ICLR 2025)",
        config=SaRATrainingConfig,
        run=train_sara,
        apply=merged,
        train_defaults={
            "learning_rate": None,
            "max_train_steps": 1000,
            "train_batch_size": 4,
            "lr_scheduler": "cosine",
            "max_grad_norm": 1.0,
        },
    )
)

__all__ = [
    "DELTA_FILE",
    "METHOD",
    "SaRAAdamW",
    "SaRAConfig",
    "SaRADelta",
    "SaRAModel",
    "SaRATrainingConfig",
    "SparseValues",
    "auto_learning_rate",
    "eligible_for_rank_loss",
    "load_into",
    "merge",
    "merged",
    "prepare",
    "rank_loss",
    "select",
    "sparse_layers",
    "train_sara",
    "unmerge",
]

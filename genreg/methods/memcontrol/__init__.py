"""MemControl (Dutt et al., WACV 2025): search which transformer blocks to fine-tune (a binary mask, with the learning
rate) so that the model learns the fine-tuning set without copying it; two objectives, memorization and quality."""

from __future__ import annotations

from ...adapters import FAMILIES, add_adapter, applied, attention_blocks, selected, target_pattern
from ...registry import Method, register
from .finetune import MemControlFinetuneConfig, choose, finetune_memcontrol, knee, parse_mask, quality_key
from .search import (
    OBJECTIVES,
    QUALITIES,
    SAMPLERS,
    MemControlConfig,
    TrialStopped,
    open_study,
    pareto_front,
    plot_pareto,
    run_trial,
    score,
    search_memcontrol,
    write_front,
)

METHOD = register(
    Method(
        name="memcontrol",
        kind="search",
        title="MemControl",
        help="search which UNet blocks to fine-tune so the model learns without memorizing (Dutt et al., WACV 2025)",
        config=MemControlConfig,
        run=search_memcontrol,
        train_defaults={"max_train_steps": 200, "train_batch_size": 8, "learning_rate": 1e-4, "max_grad_norm": 1.0},
    )
)
FINETUNE = register(
    Method(
        name="memcontrol-finetune",
        kind="finetuner",
        title="MemControl fine-tune",
        help="stage 2 of MemControl: fine-tune the blocks of a searched (or given) mask with LoRA or IA3",
        config=MemControlFinetuneConfig,
        run=finetune_memcontrol,
        apply=applied,
        train_defaults={
            "learning_rate": None,
            "max_train_steps": 200,
            "train_batch_size": 8,
            "max_grad_norm": 1.0,
        },
    )
)

__all__ = [
    "FAMILIES",
    "FINETUNE",
    "METHOD",
    "MemControlFinetuneConfig",
    "applied",
    "choose",
    "finetune_memcontrol",
    "knee",
    "parse_mask",
    "quality_key",
    "OBJECTIVES",
    "QUALITIES",
    "SAMPLERS",
    "MemControlConfig",
    "TrialStopped",
    "add_adapter",
    "attention_blocks",
    "open_study",
    "pareto_front",
    "plot_pareto",
    "run_trial",
    "score",
    "search_memcontrol",
    "selected",
    "target_pattern",
    "write_front",
]

"""The shared trainer: one accelerate-based loop, atomic checkpoints, and training data helpers."""

from .checkpoints import (
    DEFAULT_OPTIMIZER,
    flatten_optimizer_state,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from .data import ImageFolder, sample_rng
from .loop import FitResult, StepContext, TrainConfig, adamw, fit, gradient_step, process_state, trainable_state

__all__ = [
    "DEFAULT_OPTIMIZER",
    "FitResult",
    "StepContext",
    "adamw",
    "flatten_optimizer_state",
    "gradient_step",
    "unflatten_optimizer_state",
    "ImageFolder",
    "TrainConfig",
    "fit",
    "list_checkpoints",
    "load_checkpoint",
    "process_state",
    "resolve_checkpoint",
    "sample_rng",
    "save_checkpoint",
    "trainable_state",
]

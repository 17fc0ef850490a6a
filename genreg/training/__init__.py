"""The shared trainer: one accelerate-based loop, atomic checkpoints, and training data helpers."""

from .checkpoints import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import ImageFolder, sample_rng
from .loop import FitResult, TrainConfig, fit, process_state, trainable_state

__all__ = [
    "FitResult",
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

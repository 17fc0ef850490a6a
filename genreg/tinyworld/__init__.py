"""The Tiny World: a rendered world with known truth, its bundled diffusion model, and an evaluator that scores images.

from genreg.tinyworld import Scene, Obj, render, Evaluator, model_path
"""

from pathlib import Path

from .evaluator import Evaluator, Reading
from .render import render, render_many
from .world import (
    BACKGROUNDS,
    COLORS,
    DETAIL_ATTRIBUTES,
    HELD_OUT,
    NAMED_ATTRIBUTES,
    OBJECT_ATTRIBUTES,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    PromptSpec,
    Scene,
    caption,
    parse_prompt,
    sample_scene,
    scene_prompt,
)


def model_path() -> Path:
    """Directory of the bundled `tinyworld` diffusers model; ``StableDiffusionPipeline.from_pretrained`` loads it."""
    path = Path(__file__).with_name("model")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the bundled model is missing from {path}; run scripts/train_tinyworld.py")
    return path


def motion_adapter_path() -> Path:
    """Directory of the bundled AnimateDiff motion adapter (``MotionAdapter.from_pretrained`` loads it), trained over
    the bundled model by scripts/train_tinyworld_video.py."""
    path = Path(__file__).with_name("motion_adapter")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled motion adapter is missing from {path}; run scripts/train_tinyworld_video.py"
        )
    return path


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DETAIL_ATTRIBUTES",
    "HELD_OUT",
    "NAMED_ATTRIBUTES",
    "OBJECT_ATTRIBUTES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Evaluator",
    "Obj",
    "PromptSpec",
    "Reading",
    "Scene",
    "caption",
    "model_path",
    "motion_adapter_path",
    "parse_prompt",
    "render",
    "render_many",
    "sample_scene",
    "scene_prompt",
]

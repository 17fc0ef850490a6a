"""genreg: editing, personalization, fine-tuning and unlearning for diffusion models, over diffusers."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_pipeline", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `import genreg` (and the `genreg` command before it has read its flags) does
    # not import diffusers and transformers, whose import-time notices the command keeps quiet unless --verbose.
    if name == "load_pipeline":
        from .models import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'genreg' has no attribute {name!r}")

"""genreg: editing, personalization, fine-tuning and unlearning for diffusion models, over diffusers."""

from .models import load_pipeline

__version__ = "0.1.0"
__all__ = ["load_pipeline", "__version__"]

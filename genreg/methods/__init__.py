"""genreg's methods, one package each: its config, its math as plain functions, its sampler or trainer, and one
registration in ``genreg.registry``. Importing this package registers every method, in the order the surfaces
list them."""

from . import adaptive_guidance, cross_init, guide_and_rescale, memcontrol, sara, score_forgetting, textual_inversion  # noqa: F401

# isort: split
# core and hifi_tuner after the embedding baselines they build on, as the surfaces list them
from . import cono, core, hifi_tuner  # noqa: F401

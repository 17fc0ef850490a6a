"""Score Forgetting Distillation (Chen, Zhang, Zhou, ICLR 2025): forget a concept while distilling the model into a
one-step generator, from prompts alone (SiD's fake-score and generator losses, the forget branch pushing the
generator's c_f outputs to the teacher's c_o distribution). The result loads with
``genreg.pipelines.OneStepPipeline.from_pretrained(path)``."""

from __future__ import annotations

from ...registry import Method, register
from .config import SFDConfig, override_prompt, prompt_sets, tinyworld_prompts
from .losses import fake_score_loss, generate, sid_generator_loss, timestep_of_sigma, x0_prediction
from .trainer import SFDObjective, check_model, save_one_step_pipeline, train_sfd

METHOD = register(
    Method(
        name="sfd",
        kind="unlearner",
        title="Score Forgetting Distillation",
        help="forget a concept while distilling the model into a one-step generator, data-free (Chen et al., ICLR"
        " 2025)",
        config=SFDConfig,
        run=train_sfd,
        train_defaults={"learning_rate": 1e-5, "max_train_steps": 2000, "train_batch_size": 4, "max_grad_norm": 1.0},
    )
)

__all__ = [
    "METHOD",
    "SFDConfig",
    "SFDObjective",
    "check_model",
    "fake_score_loss",
    "generate",
    "override_prompt",
    "prompt_sets",
    "save_one_step_pipeline",
    "sid_generator_loss",
    "timestep_of_sigma",
    "tinyworld_prompts",
    "train_sfd",
    "x0_prediction",
]

"""HiFi Tuner's settings: the subject word the captions name, the output-space vectors and the switches of the
paper's parts (mask guidance, parameter regularization, step-wise representations), each off-able for ablations; and
the DreamBooth variant (the UNet learns the subject under the same mask)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import option
from ...training.data import TEMPLATES, ImageDataConfig, ImageFolder, check_caption

VARIANTS = ("embedding", "dreambooth")


@dataclass
class HiFiTunerConfig(ImageDataConfig):
    subject_word: str = option(
        "object", "the subject's class word, put in the captions' {} and in prompts (e.g. dog, backpack)"
    )
    num_vectors: int = option(5, "n: the prompt encoding's last n positions that the subject's vectors replace")
    mask_guidance: bool = option(
        True, "weight the diffusion loss by each image's subject mask (masks/<image stem>.png; Eq. 5)"
    )
    reg_weight: float = option(
        1e-4, "w_s: weight of ||c_s - phi_s||^2, the pull toward the empty prompt's last positions (Eq. 6)"
    )
    stepwise_steps: int = option(
        10, "I: refinement steps per sampling step for the step-wise representations (0 = one shared set; Alg. 1)"
    )
    num_inference_steps: int = option(50, "T: the sampling steps the step-wise set is made for (DDIM)")
    learnable_property: str = option(
        "object", "prompt templates when images have no captions", choices=("object", "style"), place="advanced"
    )
    # The DreamBooth variant is offered by the command line and Python; the app trains the vectors only.
    variant: str = option(
        "embedding",
        "what learns the subject: 'embedding' (the output-space vectors; the paper's TI variant) or 'dreambooth' "
        "(the UNet, whole or LoRA, under the same mask, with captions naming '<identifier> <subject_word>'; the "
        "run's max_train_steps and learning_rate are then the UNet's, e.g. 400 and 5e-6, or 1e-4 with LoRA)",
        choices=VARIANTS,
        place="hidden",
    )
    identifier: str = option("sks", "DreamBooth variant: the rare word put before the subject word", place="hidden")
    lora_rank: int = option(
        0, "DreamBooth variant: LoRA of this rank on every transformer block (0 = the whole UNet)", place="hidden"
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.subject_word.strip():
            raise ValueError("subject_word is empty: name the subject's class, e.g. 'dog'")
        check_caption(self.subject_word, "subject_word")
        if self.num_vectors < 1:
            raise ValueError(f"num_vectors must be at least 1, got {self.num_vectors}")
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight}")
        if self.stepwise_steps < 0:
            raise ValueError(f"stepwise_steps must be >= 0 (0 = no step-wise set), got {self.stepwise_steps}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if self.learnable_property not in TEMPLATES:
            raise ValueError(f"learnable_property must be one of {', '.join(TEMPLATES)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not self.identifier.strip():
            raise ValueError("identifier is empty: give the DreamBooth variant a rare word, e.g. 'sks'")
        check_caption(self.identifier, "identifier")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = the whole UNet), got {self.lora_rank}")

    @property
    def dreambooth(self) -> bool:
        return self.variant == "dreambooth"

    @property
    def words(self) -> str:
        """What the captions' {} and the prompts say for the subject: its word, after the identifier for DreamBooth."""
        return f"{self.identifier} {self.subject_word}" if self.dreambooth else self.subject_word

    def later_steps(self) -> int:
        """Steps the run takes after the shared set's ``max_train_steps``: the step-wise stage, I per sampling step
        (none for the DreamBooth variant, which has no vectors to refine)."""
        return 0 if self.dreambooth else self.stepwise_steps * self.num_inference_steps

    def data(self, pipe) -> ImageFolder:
        """The images, with masks checked present when mask guidance is on."""
        folder = self.read(pipe, self.learnable_property)
        if self.mask_guidance and not folder.has_masks:
            raise ValueError(
                f"mask guidance needs a mask for every image in {self.train_data_dir}: put masks/<image stem>.png "
                "beside the images (white = subject), or pass --no-mask_guidance"
            )
        return folder

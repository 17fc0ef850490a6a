"""Guide-and-Rescale's settings: the config dataclass, the official presets, and one edit request of the app/CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from ...checks import require_choice, require_positive_int
from ...config import option

FEATURE_LOSSES = ("l1", "l2")
FEATURE_PROMPTS = ("source", "target")
INVERSIONS = ("ddim", "negative-prompt")


@dataclass(frozen=True)
class GuideAndRescaleConfig:
    """Settings of one GaR edit; ``GuideAndRescaleConfig.preset("local" | "style", **changes)`` starts from the
    official configurations."""

    guidance_scale: float = field(
        default=7.5, metadata={"help": "CFG scale w towards the target prompt", "place": "advanced"}
    )
    self_attn_scale: float = field(
        default=300_000.0,
        metadata={"help": "weight of the self-attention energy (v_self; 0 turns it off)", "place": "advanced"},
    )
    feature_scale: float = field(
        default=500.0, metadata={"help": "weight of the feature energy (v_feat; 0 = off)", "place": "advanced"}
    )
    guided_fraction: float = field(
        default=0.6,
        metadata={"help": "fraction of the steps, from the first, on which the guiders act", "place": "advanced"},
    )
    rescale_lower: float = field(
        default=0.33,
        metadata={"help": "least norm of the guider term, as a multiple of the CFG term's norm", "place": "advanced"},
    )
    rescale_upper: float = field(
        default=3.0,
        metadata={
            "help": "largest norm of the guider term, as a multiple of the CFG term's norm",
            "place": "advanced",
        },
    )
    feature_layer: str = field(
        default="up_blocks.-1",
        metadata={"help": "UNet module whose output the feature energy compares", "place": "advanced"},
    )
    feature_loss: str = field(
        default="l1",
        metadata={
            "help": "feature energy: 'l1' (local edits) or 'l2' (style)",
            "choices": ("l1", "l2"),
            "place": "advanced",
        },
    )
    feature_prompt: str = field(
        default="source",
        metadata={
            "help": "prompt of the current feature pass: 'source', or 'target' (stylisation)",
            "choices": ("source", "target"),
            "place": "advanced",
        },
    )
    self_attn_blocks: tuple[str, ...] = field(
        default=("down", "mid", "up"),
        metadata={"help": "UNet blocks whose self-attention is compared", "place": "hidden"},
    )
    self_attn_levels: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "resolution levels compared (0 = the latent's; 1 = half; ...); leaving out 0 saves memory",
            "place": "hidden",
        },
    )
    inversion: str = field(
        default="ddim",
        metadata={
            "help": "'ddim': CFG against the empty prompt (official best configs); 'negative-prompt': negative-prompt "
            "inversion (the official code's npinv), CFG against the source prompt, so unedited content follows the "
            "inversion",
            "choices": INVERSIONS,
            "place": "advanced",
        },
    )
    chunk_size: int = field(
        default=256, metadata={"help": "query rows per chunk of the self-attention energy", "place": "hidden"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute UNet activations in the guider's backward to save memory", "place": "advanced"},
    )

    def __post_init__(self):
        for name in (
            "guidance_scale",
            "self_attn_scale",
            "feature_scale",
            "guided_fraction",
            "rescale_lower",
            "rescale_upper",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.guided_fraction > 1:
            raise ValueError(f"guided_fraction must be within [0, 1], got {self.guided_fraction!r}")
        if self.rescale_lower > self.rescale_upper:
            raise ValueError(
                f"rescale_lower ({self.rescale_lower}) must not exceed rescale_upper ({self.rescale_upper})"
            )
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"unknown feature_loss {self.feature_loss!r}; choose one of {', '.join(FEATURE_LOSSES)}")
        if self.feature_prompt not in FEATURE_PROMPTS:
            raise ValueError(f"unknown feature_prompt {self.feature_prompt!r}; choose 'source' or 'target'")
        if self.inversion not in INVERSIONS:
            raise ValueError(f"unknown inversion {self.inversion!r}; choose one of {', '.join(INVERSIONS)}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive whole number, got {self.chunk_size!r}")
        if not self.self_attn_blocks or any(not isinstance(b, str) or not b for b in self.self_attn_blocks):
            raise ValueError(
                f"self_attn_blocks must name blocks, e.g. ('down', 'mid', 'up'); got {self.self_attn_blocks}"
            )
        if self.self_attn_levels is not None and any(
            isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.self_attn_levels
        ):
            raise ValueError(f"self_attn_levels must be whole numbers >= 0, got {self.self_attn_levels}")

    @classmethod
    def preset(cls, name: str, **changes) -> GuideAndRescaleConfig:
        """A preset (``"local"`` or ``"style"``) with ``changes`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name].changed(**changes)

    def changed(self, **changes) -> GuideAndRescaleConfig:
        """A copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown GaR setting(s) {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    @property
    def guides(self) -> bool:
        """Whether any guider can act (otherwise an edit is inversion + plain CFG)."""
        return (self.self_attn_scale > 0 or self.feature_scale > 0) and self.rescale_upper > 0

    def guided_steps(self, num_steps: int) -> int:
        """Steps, from the first, on which the guiders act (the paper's tau), rounded half up."""
        return math.floor(self.guided_fraction * num_steps + 0.5) if self.guides else 0


PRESETS: dict[str, GuideAndRescaleConfig] = {
    # Official non-stylisation config (paper App. A scales; the code's 30 of 50 guided steps; range rescaling).
    "local": GuideAndRescaleConfig(),
    # Official stylisation config: L2 features of up_blocks[1].resnets[1] from the target pass; fixed 1.5 rescaling.
    "style": GuideAndRescaleConfig(
        self_attn_scale=100_000.0,
        feature_scale=2.5,
        guided_fraction=0.5,
        rescale_lower=1.5,
        rescale_upper=1.5,
        feature_layer="up_blocks.1.resnets.1",
        feature_loss="l2",
        feature_prompt="target",
    ),
}


def check_prompts(source_prompt, target_prompt) -> tuple[str, str]:
    """Both prompts as text; refuses empty ones and a target that repeats the source (there is nothing to edit)."""
    for name, prompt, hint in (
        ("source_prompt", source_prompt, "describe the image as it is, e.g. 'a red circle on the left'"),
        ("target_prompt", target_prompt, "describe the edited image, e.g. 'a blue circle on the left'"),
    ):
        if not isinstance(prompt, str):
            raise ValueError(f"{name} must be one text prompt, not {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"{name} is empty: {hint}")
    if " ".join(source_prompt.split()).lower() == " ".join(target_prompt.split()).lower():
        raise ValueError(
            "source_prompt and target_prompt are the same, so there is nothing to edit: change the target prompt "
            "to describe the edited image"
        )
    return source_prompt, target_prompt


@dataclass
class EditOptions:
    """One Guide-and-Rescale edit: what the image shows, what it should show, and the preset to start from."""

    source_prompt: str = option("a large red circle on the left", "the image as it is", aliases=("--source",))
    target_prompt: str = option(
        "a large blue circle on the left", "the same words, changed to say the edit", aliases=("--target",)
    )
    preset: str = option(
        "local",
        "'local' edits objects and keeps the rest; 'style' restyles the whole image",
        choices=tuple(PRESETS),
        labels={"local": "local edit", "style": "style"},
    )
    num_inference_steps: int = option(
        50, "DDIM steps, for the inversion and for the edit", minimum=1, maximum=100, aliases=("--steps",)
    )

    def __post_init__(self):
        check_prompts(self.source_prompt, self.target_prompt)
        require_choice("preset", self.preset, tuple(PRESETS))
        require_positive_int("num_inference_steps", self.num_inference_steps)

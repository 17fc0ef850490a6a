"""CoRe's settings and its regularization prompt sets (contexts with ``{}`` for the subject; no images needed).

The sets follow the paper's kinds of context (Wu et al., Sec. 4 and Appendix): a new background, a colour change,
an artistic style, a style composition, and for animate subjects actions and outfits. They are genreg's own wording.
``tinyworld`` is the bundled model's counterpart: every context its words can say (position, size, background, a
second object), none of them one of the personalization benchmark's evaluation prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...config import option
from ...embeddings import EmbeddingConfig
from ...training.data import check_caption

_BACKGROUNDS = [
    "a {} on a sandy beach",
    "a {} in a snowy forest",
    "a {} on a city street at night",
    "a {} in a field of sunflowers",
    "a {} on a wooden table in a kitchen",
    "a {} floating in outer space",
    "a {} under water next to a coral reef",
    "a {} on top of a mountain",
    "a {} in the jungle",
    "a {} in front of the eiffel tower",
    "a {} on a red carpet",
    "a {} in a desert at sunset",
]
_COLOURS = [
    "a red {}",
    "a blue {}",
    "a green {}",
    "a purple {}",
    "a shiny golden {}",
    "a black and white {}",
]
_STYLES = [
    "an oil painting of a {}",
    "a watercolour painting of a {}",
    "a pencil sketch of a {}",
    "a {} in the style of van gogh",
    "a {} in pixel art style",
    "a {} as a cartoon character",
    "a low-poly 3d render of a {}",
    "a {} in the style of a japanese woodblock print",
    "a {} made of lego bricks",
    "a marble statue of a {}",
]
_COMPOSITIONS = [
    "a {} next to a cup of coffee",
    "a {} beside a vase of flowers",
    "a {} and a cat on a sofa",
    "a {} on a bookshelf full of books",
    "a {} in a basket with apples",
    "a {} wearing a tiny hat",
]
_ACTIONS = [
    "a {} running in a park",
    "a {} jumping over a fence",
    "a {} sleeping on a bed",
    "a {} swimming in a lake",
    "a {} reading a book",
    "a {} playing the guitar",
    "a {} riding a bicycle",
    "a {} eating an ice cream",
]
_OUTFITS = [
    "a {} wearing a red scarf",
    "a {} in a superhero costume",
    "a {} wearing sunglasses",
    "a {} in a knight's armour",
    "a {} wearing a chef's hat",
    "a {} in a santa claus outfit",
]


def tinyworld_contexts() -> list[str]:
    """The tiny world's contexts for a subject ``{}``: each position with and without a size, on either background,
    and beside a second object; the personalization benchmark's evaluation prompts are left out."""
    from ...tinyworld.subjects import SUBJECTS, evaluation_cases
    from ...tinyworld.world import BACKGROUNDS, PAIR_POSITIONS, POSITION_PHRASES, SIZES, Obj, object_phrase

    places = [phrase for phrases in POSITION_PHRASES.values() for phrase in phrases]
    single = [f"a {size}{{}} {place}" for size in ("", *(f"{s} " for s in SIZES)) for place in places]
    backed = [f"{p} on a {b} background" for p in single for b in BACKGROUNDS]
    pairs = [
        f"a {{}} {POSITION_PHRASES[mine][0]} and {object_phrase(Obj(shape, colour, 'small', other), size=False)} "
        f"{POSITION_PHRASES[other][0]}"
        for mine, other in zip(PAIR_POSITIONS, ("right", "left", "bottom", "top"), strict=True)
        for colour, shape in (("cyan", "moon"), ("orange", "diamond"), ("purple", "star"))
    ]
    held_out = {case.template for subject in SUBJECTS.values() for case in evaluation_cases(subject)}
    return [t for t in dict.fromkeys(single + backed + pairs) if t not in held_out]


PROMPT_SETS = {
    "inanimate": lambda: _BACKGROUNDS + _COLOURS + _STYLES + _COMPOSITIONS,
    "animate": lambda: _BACKGROUNDS + _STYLES + _ACTIONS + _OUTFITS,
    "universal": lambda: _BACKGROUNDS + _STYLES,
    "tinyworld": tinyworld_contexts,
}


def check_context(text: str, where: str) -> str:
    """A context with exactly one ``{}`` where the subject goes, or an error naming ``where`` and the fix."""
    check_caption(text, where)
    if text.count("{}") != 1:
        raise ValueError(
            f"{where} ({text!r}) needs exactly one {{}} where the subject goes, e.g. 'a {{}} on the beach'"
        )
    return text


def read_prompt_file(path: str | Path) -> list[str]:
    """One context per line, each with ``{}`` for the subject; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file {path} not found: give a .txt file with one prompt per line") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({err}); save it as plain text") from err
    except OSError as err:
        raise ValueError(f"cannot read prompt file {path} ({err.strerror}): give a readable .txt file") from err
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt: write one per line, e.g. 'a {{}} on the beach'")
    return [check_context(prompt, f"{path} prompt {n}") for n, prompt in enumerate(prompts, 1)]


@dataclass
class CoReConfig(EmbeddingConfig):
    """Stage 1 (the token), optional stage 2 (the UNet) and optional test-time optimization for one prompt."""

    num_vectors: int = option(1, "embedding vectors behind the placeholder (the paper: 1)")
    initializer_token: str = option(
        "object",
        "the subject's category, one token (e.g. dog): the initial embedding and the word contexts compare to",
    )
    prompt_set: str = option(
        "inanimate", "regularization contexts (no images needed)", choices=tuple(PROMPT_SETS), place="advanced"
    )
    prompt_file: str | None = option(
        None,
        "a .txt file of contexts, one per line with {} (overrides --prompt_set)",
        place="advanced",
        file_types=(".txt",),
    )
    embedding_weight: float = option(1.5e-4, "lambda_emb: context embedding regularization (Eq. 3; 0 = off)")
    attention_weight: float = option(
        0.05,
        "lambda_attn: context attention regularization (Eq. 4; 0 = off; costs two more UNet passes a step). genreg "
        "averages it over the batch and squares after averaging the layers, as the paper writes; the official code "
        "sums over the batch and squares per layer, so its 0.05 weighs more",
    )
    rescale_start: float = option(
        0.4, "embedding-norm rescaling from this fraction of the steps (Eq. 6)", place="advanced"
    )
    rescale_end: float = option(0.6, "... until this fraction (equal to the start: no rescaling)", place="advanced")
    unet_steps: int = option(
        0, "stage 2: then fine-tune the UNet with the token frozen for this many steps (0 = off; the paper: 1000)"
    )
    unet_learning_rate: float = option(
        2e-6, "stage 2 learning rate (the paper: 2e-6 for the whole UNet)", place="advanced"
    )
    unet_lora_rank: int = option(
        0,
        "stage 2 with LoRA of this rank on every transformer block instead of the whole UNet (0 = whole UNet; "
        "LoRA needs far less memory)",
        place="advanced",
    )
    tto_prompt: str | None = option(
        None,
        "test-time optimization: tune the token for this one prompt with {} (10 steps, no diffusion loss)",
        place="advanced",
    )
    tto_steps: int = option(10, "test-time optimization steps", place="advanced")
    tto_learning_rate: float = option(5e-4, "test-time optimization learning rate", place="advanced")

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_set not in PROMPT_SETS:
            raise ValueError(f"prompt_set {self.prompt_set!r} unknown; choose one of {', '.join(PROMPT_SETS)}")
        for name in ("embedding_weight", "attention_weight", "unet_learning_rate", "tto_learning_rate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.rescale_start <= self.rescale_end <= 1:
            raise ValueError(
                f"the rescaling window must satisfy 0 <= rescale_start <= rescale_end <= 1 (fractions of the steps), "
                f"got {self.rescale_start} and {self.rescale_end}"
            )
        for name in ("unet_steps", "unet_lora_rank", "tto_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tto_prompt is not None:
            check_context(self.tto_prompt, "tto_prompt")
            if not (self.embedding_weight or self.attention_weight):
                raise ValueError(
                    "test-time optimization has no diffusion loss, so it needs a regularizer: set embedding_weight or "
                    "attention_weight > 0, or leave tto_prompt unset"
                )
        if self.prompt_file:
            read_prompt_file(self.prompt_file)  # an unreadable or empty file fails before any work

    def contexts(self) -> list[str]:
        """The regularization prompts: the file's, else the named set's."""
        return read_prompt_file(self.prompt_file) if self.prompt_file else PROMPT_SETS[self.prompt_set]()

    def later_steps(self) -> int:
        """Steps the run takes after the token's ``max_train_steps`` (stage 2, test-time optimization)."""
        return self.unet_steps + (self.tto_steps if self.tto_prompt else 0)

    def rescale_window(self, steps: int) -> range:
        """The (0-based) optimizer steps after which the norm is held: the paper's 120-180 of 300 as fractions."""
        return range(round(self.rescale_start * steps), round(self.rescale_end * steps))

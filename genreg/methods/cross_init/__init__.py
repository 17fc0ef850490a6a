"""Cross Initialization (Pang et al., CVPR 2024): v^0 = E(m)_{1..N}, m_k = mean_names W[t_k]; L + lambda ||v - v^0||_2.

The initial embedding is the text encoder's *output* for the mean input embedding of a reference word set (the paper
uses celebrity names for faces), written into the new tokens' *input* rows; training adds lambda times the unsquared
L2 distance to that init (official code: ``pairwise_distance``, lambda = 1e-5, 320 steps, 2 vectors, lr 5e-3).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ...config import option
from ...embeddings import EmbeddingConfig, PlaceholderVectors, encoder_outputs, train_embedding
from ...registry import Method, register
from ...training import TrainConfig

# Reference phrases per subject class. Column k of the init averages the k-th token of every phrase, so
# "first last" names give a mean first-name and a mean last-name vector, as the paper's name list does.
_FIRST = "james mary john patricia robert jennifer michael linda david elizabeth william susan richard jessica".split()
_LAST = (
    "smith johnson williams brown jones garcia miller davis rodriguez martinez wilson anderson taylor moore".split()
)
REFERENCE_WORDS: dict[str, list[str]] = {
    "person": [f"{a} {b}" for a, b in zip(_FIRST, _LAST, strict=True)],
    "dog": "golden retriever|german shepherd|border collie|french bulldog|siberian husky|labrador retriever|"
    "cocker spaniel|great dane|shiba inu|jack russell".split("|"),
    "cat": "maine coon|persian cat|siamese cat|bengal cat|ragdoll cat|british shorthair|sphynx cat|"
    "scottish fold".split("|"),
}


def tinyworld_reference_words(shape: str | None = None) -> list[str]:
    """The tiny world's counterpart of a list of names: every base-world "colour shape" name, or, given a shape (the
    subject's class, as "person" is a face's), every base colour of that shape."""
    from ...tinyworld.world import OBJECT_ATTRIBUTES, allowed_values

    if shape is not None and shape not in OBJECT_ATTRIBUTES["shape"]:
        raise ValueError(f"tiny-world shape {shape!r} unknown; choose one of {', '.join(OBJECT_ATTRIBUTES['shape'])}")
    shapes = allowed_values("shape", True) if shape is None else (shape,)
    return [f"{c} {s}" for c, s in itertools.product(allowed_values("color", True), shapes)]


def _tinyworld_words(subject_class: str) -> list[str] | None:
    """The reference words of 'tinyworld' (every shape) or 'tinyworld:SHAPE'; None for any other class."""
    name, _, shape = subject_class.partition(":")
    return tinyworld_reference_words(shape or None) if name == "tinyworld" else None


@dataclass
class CrossInitConfig(EmbeddingConfig):
    subject_class: str = option(
        "person", "default reference words: person, dog, cat, tinyworld (every shape) or tinyworld:SHAPE"
    )
    reference_words: list[str] | None = option(
        None, "reference names/phrases (overrides --subject_class)", place="advanced"
    )
    reference_file: str | None = option(
        None, "a file of reference names, one per line (overrides both)", place="advanced", file_types=(".txt",)
    )
    reg_weight: float = option(1e-5, "lambda: weight of the L2 distance to the initial embedding")

    def __post_init__(self):
        super().__post_init__()
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight}")
        if _tinyworld_words(self.subject_class) is None and self.subject_class not in REFERENCE_WORDS:
            raise ValueError(
                f"subject_class {self.subject_class!r} unknown; choose {', '.join(REFERENCE_WORDS)}, tinyworld or "
                "tinyworld:SHAPE (e.g. tinyworld:star)"
            )

    def words(self) -> list[str]:
        if self.reference_file:
            path = Path(self.reference_file)
            if not path.is_file():
                raise FileNotFoundError(f"reference file {path} not found")
            words = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        elif self.reference_words:
            words = list(self.reference_words)
        else:
            words = _tinyworld_words(self.subject_class) or REFERENCE_WORDS[self.subject_class]
        if not words:
            raise ValueError("the reference word list is empty: give at least one name or phrase")
        return words


def mean_token_rows(text_encoder, tokenizer, words: list[str], num_vectors: int) -> torch.Tensor:
    """m_k = mean over phrases of the input embedding of their k-th token, k = 1..N."""
    table = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    columns: list[list[torch.Tensor]] = [[] for _ in range(num_vectors)]
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"reference word {word!r} gives no tokens")
        for k, token_id in enumerate(ids[:num_vectors]):
            columns[k].append(table[token_id])
    for k, column in enumerate(columns):
        if not column:
            raise ValueError(
                f"no reference phrase has a token {k + 1}: with {num_vectors} vectors give phrases of "
                f"{num_vectors} tokens (e.g. 'first last' names), or use fewer vectors"
            )
    return torch.stack([torch.stack(c).mean(0) for c in columns])


def init_distance(vectors: torch.Tensor, init: torch.Tensor, weight: float) -> torch.Tensor:
    """lambda * mean_k ||v_k - v_k^0||_2 (Cross Initialization Sec. 3): the unsquared L2 pull towards the init."""
    return weight * (vectors - init).norm(dim=-1).mean()


def train_cross_init(pipe, config: CrossInitConfig, train: TrainConfig, **fit_kwargs) -> Path:
    """Trains a Cross Initialization embedding on ``pipe``; returns the ``learned_embeds.safetensors`` path."""
    words = config.words()

    def init(placeholder: PlaceholderVectors) -> torch.Tensor:
        rows = mean_token_rows(pipe.text_encoder, pipe.tokenizer, words, config.num_vectors)
        return encoder_outputs(pipe.text_encoder, pipe.tokenizer, placeholder, rows)

    regularizer = partial(init_distance, weight=config.reg_weight) if config.reg_weight else None
    return train_embedding(pipe, config, train, init, regularizer, **fit_kwargs)


METHOD = register(
    Method(
        name="cross-init",
        kind="trainer",
        title="Cross Initialization",
        help="learn a subject's token embedding from a few images, started from the text encoder's output for"
        " reference names (Pang et al., CVPR 2024)",
        config=CrossInitConfig,
        run=train_cross_init,
        train_defaults={"max_train_steps": 320, "learning_rate": 5e-3, "train_batch_size": 8},
    )
)

__all__ = [
    "METHOD",
    "REFERENCE_WORDS",
    "CrossInitConfig",
    "init_distance",
    "mean_token_rows",
    "tinyworld_reference_words",
    "train_cross_init",
]

"""Learned token embeddings, the layer the embedding methods share: placeholder tokens, their trainable rows, the
diffusion-loss objective with an optional method-supplied regulariser, the trainer, and the saved file.

A placeholder of N vectors is N new tokens named as diffusers names them (``<tok>``, ``<tok>_1``, ...), so the
saved ``learned_embeds.safetensors`` (``{"<tok>": tensor[N, d]}``) loads with ``pipe.load_textual_inversion`` and
prompts may say ``<tok>`` alone. Only the placeholder rows are trained: they live in a separate parameter that a
forward hook substitutes into the token-embedding output, so every other row of the table is untouched by
construction (it is not even seen by the optimizer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import option
from .diffusion import diffusion_loss
from .io import atomic_write
from .training import TrainConfig, fit, process_state
from .training.data import TEMPLATES, ImageDataConfig, ImageFolder, check_caption

EMBEDS_FILE = "learned_embeds.safetensors"
INIT_FILE = "initial_embeds.safetensors"  # v^0, kept beside the result to show how far training moved it

# R(v, v^0): a method's scalar term added to the diffusion loss, from the (N, d) vectors and their initial values
Regularizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def placeholder_names(token: str, num_vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def require_new_tokens(tokenizer, names: list[str]) -> None:
    """Refuses placeholder names the tokenizer already knows: a learnt token must not take over a word."""
    vocab = tokenizer.get_vocab()
    taken = [n for n in names if n in vocab or n.lower() in vocab or f"{n.lower()}</w>" in vocab]
    if taken:
        raise ValueError(
            f"placeholder {taken[0]!r} is already in the tokenizer's vocabulary: a learnt token would take over that "
            f"word; choose a new token, e.g. '<{taken[0].strip('<>')}-v2>'"
        )


def add_placeholder(tokenizer, text_encoder, token: str, num_vectors: int) -> list[int]:
    """Adds the placeholder's tokens and embedding rows; returns their ids."""
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"placeholder token {token!r} must be one word without spaces, e.g. '<my-subject>'")
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be at least 1, got {num_vectors}")
    names = placeholder_names(token, num_vectors)
    require_new_tokens(tokenizer, names)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are set right after
    return ids


def prompt_with(template: str, token: str, num_vectors: int) -> str:
    """Fills ``{}`` with the placeholder spelt out as all its tokens (what ``maybe_convert_prompt`` does)."""
    return template.format(" ".join(placeholder_names(token, num_vectors)))


def single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"{word!r} is {len(ids)} tokens for this tokenizer; the initializer (or category) word must be a single "
            "token: choose a one-token word, e.g. 'dog' or 'object'"
        )
    return ids[0]


def initializer_vectors(text_encoder, tokenizer, word: str, num_vectors: int) -> torch.Tensor:
    """Every vector starts as the input embedding of ``word`` (diffusers' textual inversion)."""
    row = text_encoder.get_input_embeddings().weight[single_token_id(tokenizer, word)]
    return row.detach().float().cpu().expand(num_vectors, -1).clone()


class PlaceholderVectors(nn.Module):
    """The placeholder rows as one trainable (N, d) parameter, substituted into the token-embedding output."""

    def __init__(self, text_encoder, ids: list[int], init: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(init.detach().clone().float())
        self.register_buffer("ids", torch.tensor(ids), persistent=False)
        self._handle = text_encoder.get_input_embeddings().register_forward_hook(self._substitute)

    def _substitute(self, module, args, output):
        onehot = args[0].unsqueeze(-1) == self.ids.to(args[0].device)  # (B, L, N)
        hit = onehot.any(-1, keepdim=True)
        if not hit.any():
            return output
        rows = onehot.to(output.dtype) @ self.vectors.to(output.dtype)
        return torch.where(hit, rows, output)

    def write_and_detach(self, text_encoder) -> None:
        """Writes the vectors into the embedding table and removes the hook (the model then works on its own)."""
        self._handle.remove()
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[self.ids] = self.vectors.to(text_encoder.dtype)


def save_learned_embeds(path: str | Path, token: str, vectors: torch.Tensor) -> Path:
    """``{token: tensor[N, d]}`` in safetensors, the format ``load_textual_inversion`` reads; written atomically."""
    tensors = {token: vectors.detach().float().cpu().contiguous()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_learned_embeds(path: str | Path) -> tuple[str, torch.Tensor]:
    """(token, (N, d) vectors) from a single-token embeddings file."""
    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise ValueError(f"{path} holds {len(tensors)} tensors; an embeddings file holds one (token -> vectors)")
    ((token, vectors),) = tensors.items()
    if not torch.isfinite(vectors).all():
        raise ValueError(f"{path} holds NaN or infinite values for {token!r}: the file is damaged; train it again")
    return token, vectors if vectors.ndim == 2 else vectors[None]


def encoder_outputs(text_encoder, tokenizer, placeholder: PlaceholderVectors, rows: torch.Tensor) -> torch.Tensor:
    """E([BOS, r_1..r_N, EOS, ...])[1..N]: the text encoder's output at the positions holding input rows ``rows``."""
    saved = placeholder.vectors.detach().clone()
    names = tokenizer.convert_ids_to_tokens(placeholder.ids.tolist())
    ids = tokenizer(" ".join(names), padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        placeholder.vectors.copy_(rows)
        hidden = text_encoder(ids.input_ids.to(text_encoder.device))[0][0, 1 : 1 + len(rows)].float()
        placeholder.vectors.copy_(saved)
    return hidden.cpu()


class EmbeddingObjective(nn.Module):
    """L = ||target - net(z_t, t, E(y))||^2 (Gal et al. 2022, Eq. 2) + R(v, v^0) when a method supplies R."""

    def __init__(self, pipe, placeholder: PlaceholderVectors, regularizer: Regularizer | None = None):
        super().__init__()
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        self.scheduler = pipe.scheduler
        self.placeholder = placeholder
        self.register_buffer("init", placeholder.vectors.detach().clone())
        self.regularizer = regularizer

    def forward(self, batch: dict) -> torch.Tensor:
        loss = diffusion_loss(self.unet, self.vae, self.scheduler, batch, self.text_encoder(batch["input_ids"])[0])
        if self.regularizer is not None:
            loss = loss + self.regularizer(self.placeholder.vectors, self.init)
        return loss


@dataclass
class EmbeddingConfig(ImageDataConfig):
    """What an embedding trainer needs besides the shared training settings."""

    placeholder_token: str = option("<subject>", "the new token that names the subject in prompts")
    num_vectors: int = option(2, "embedding vectors behind the placeholder")
    learnable_property: str = option(
        "object", "prompt templates when images have no captions", choices=("object", "style"), place="advanced"
    )
    validation_prompt: str | None = option(
        None, "a prompt with {} for the token, sampled every --validation_steps", place="advanced"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_vectors < 1:
            raise ValueError(f"num_vectors must be at least 1, got {self.num_vectors}")
        if self.validation_prompt is not None:
            check_caption(self.validation_prompt, "validation_prompt")
            if "{}" not in self.validation_prompt:
                raise ValueError(
                    f"validation_prompt {self.validation_prompt!r} has no {{}} where the token goes, e.g. 'a {{}} on "
                    "the left'"
                )
        if self.learnable_property not in TEMPLATES:
            raise ValueError(f"learnable_property must be one of {', '.join(TEMPLATES)}")


def train_embedding(
    pipe,
    config: EmbeddingConfig,
    train: TrainConfig,
    init: Callable[[PlaceholderVectors], torch.Tensor],
    regularizer: Regularizer | None = None,
    *,
    objective: Callable[[PlaceholderVectors], nn.Module] | None = None,
    extra: Callable[[], Callable[[int, int], dict]] | None = None,
    **fit_kwargs,
) -> Path:
    """Adds ``config.placeholder_token`` to ``pipe``, trains its vectors from ``init(placeholder)``, saves them.

    The loss is the diffusion loss plus ``regularizer(v, v^0)`` when given (``None``: plain textual inversion), or a
    method's own ``objective(placeholder)``; ``extra()``, called once the placeholder's tokens exist, returns
    ``fields(step, index)``, a method's additions to each sample.

    Returns the path of ``learned_embeds.safetensors`` in ``train.output_dir``; each ``checkpoint-N/`` holds one
    too, and ``initial_embeds.safetensors`` keeps the initial vectors. On return ``pipe`` generates with the token.
    """
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("embedding training supports pipelines with one text encoder (SD 1.x/2.x), not SDXL yet")
    data = config.read(pipe, config.learnable_property)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    ids = add_placeholder(tokenizer, text_encoder, config.placeholder_token, config.num_vectors)
    placeholder = PlaceholderVectors(text_encoder, ids, text_encoder.get_input_embeddings().weight[ids])
    with torch.no_grad():
        placeholder.vectors.copy_(init(placeholder))
    built = objective(placeholder) if objective else EmbeddingObjective(pipe, placeholder, regularizer)
    fields = extra() if extra is not None else None
    return fit_vectors(pipe, placeholder, built, data, config, train, fields, **fit_kwargs)


def fit_vectors(
    pipe,
    placeholder: PlaceholderVectors,
    objective: nn.Module,
    data: ImageFolder,
    config: EmbeddingConfig,
    train: TrainConfig,
    extra: Callable[[int, int], dict] | None = None,
    **fit_kwargs,
) -> Path:
    """Trains ``placeholder``'s vectors under ``objective`` on the shared loop, writes them into the text encoder and
    saves ``learned_embeds.safetensors`` (and ``initial_embeds.safetensors``) in ``train.output_dir``."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    objective = objective.to(pipe.device)
    token = config.placeholder_token
    # What a resumed run must share with this one (where the images are may change; validation does not matter).
    kept = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("train_data_dir", "validation_prompt")}
    run_settings = {"method": type(config).__name__, **kept}
    if process_state().is_main_process:
        Path(train.output_dir).mkdir(parents=True, exist_ok=True)
        save_learned_embeds(Path(train.output_dir) / INIT_FILE, token, placeholder.vectors)

    names = " ".join(placeholder_names(token, config.num_vectors))

    def sample(step: int, index: int) -> dict:
        example = data.sample(tokenizer, train.seed, step, index, names)
        return example | extra(step, index) if extra is not None else example

    def export(core: nn.Module, directory: Path) -> None:
        save_learned_embeds(directory / EMBEDS_FILE, token, core.placeholder.vectors)

    def validate(core: nn.Module, step: int) -> None:
        from .io import image_grid, save_image

        prompt = prompt_with(config.validation_prompt, token, config.num_vectors)
        images = pipe([prompt] * 4, num_inference_steps=25, generator=torch.Generator().manual_seed(train.seed)).images
        save_image(image_grid(images), Path(train.output_dir) / "validation" / f"step-{step}.png")

    fit(
        objective,
        sample,
        train,
        export=export,
        settings=run_settings,
        validate=validate if config.validation_prompt else None,
        **fit_kwargs,
    )
    placeholder.write_and_detach(text_encoder)
    path = Path(train.output_dir) / EMBEDS_FILE
    if process_state().is_main_process:
        save_learned_embeds(path, token, placeholder.vectors)
    return path

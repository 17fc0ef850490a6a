"""CoRe's training on the shared loop: stage 1 (the token, Eq. 5 with the Eq. 6 rescaling), stage 2 (the UNet with
the token frozen, whole or LoRA) and test-time optimization for one prompt (Eq. 5 without the diffusion loss).

Contexts are tokenized once; each sample draws its own context (a pure function of seed, step and index, so resumed
runs match), and the attention term runs the UNet on that sample's own noisy latent and timestep under both prompts.
Cross-attention maps are read through the shared attention layer's recorder, installed only for those two passes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...adapters import fine_tune_unet
from ...attention import AttentionRecorder, recording, select_layers
from ...diffusion import noised_batch
from ...embeddings import (
    EmbeddingObjective,
    PlaceholderVectors,
    fit_vectors,
    initializer_vectors,
    placeholder_names,
    single_token_id,
    train_embedding,
)
from ...training import StepContext, TrainConfig, gradient_step
from .config import CoReConfig, check_context
from .regularizers import (
    context_attention_loss,
    context_embedding_loss,
    context_positions,
    rescale_to,
    token_attention,
)

logger = logging.getLogger(__name__)

UNET_STAGE = "unet-stage"  # stage 2's checkpoints, inside the run's output_dir
TEST_TIME = "test-time"  # the test-time optimization's run and result


class Contexts:
    """The regularization prompts tokenized under the subject (``y*``) and under the category word (``y_cat``), with
    the masks of their context tokens; ``sample(seed, step, index)`` draws one for a training sample."""

    def __init__(self, tokenizer, templates: list[str], names: list[str], category: str):
        subject_ids = tokenizer.convert_tokens_to_ids(names)
        category_id = single_token_id(tokenizer, category)
        length, eos = tokenizer.model_max_length, tokenizer.eos_token_id
        self.rows = []
        for template in templates:
            ids, cat_ids = (
                tokenizer(template.format(word), padding="max_length", max_length=length, truncation=True).input_ids
                for word in (" ".join(names), category)
            )
            start = next((i for i, t in enumerate(ids) if t == subject_ids[0]), None)
            if start is None or ids[start : start + len(names)] != subject_ids or cat_ids[start] != category_id:
                raise ValueError(
                    f"context {template!r} does not hold the subject where its {{}} is: put spaces around {{}} and "
                    f"keep the context within the tokenizer's {length} tokens"
                )
            rows = [context_positions(seq, start, width, eos) for seq, width in ((ids, len(names)), (cat_ids, 1))]
            if [ids[i] for i in rows[0]] != [cat_ids[i] for i in rows[1]]:
                raise ValueError(
                    f"context {template!r} is cut at the tokenizer's {length} tokens under the subject's "
                    f"{len(names)} vectors: shorten it"
                )
            masks = [torch.zeros(length, dtype=torch.bool) for _ in rows]
            for mask, positions in zip(masks, rows, strict=True):
                mask[positions] = True
            self.rows.append((torch.tensor(ids), torch.tensor(cat_ids), *masks))

    def sample(self, seed: int, step: int, index: int) -> dict:
        rng = np.random.default_rng([seed, step, index, 1])  # a stream of its own beside the image sample's
        ids, cat_ids, mask, cat_mask = self.rows[int(rng.integers(len(self.rows)))]
        return {"context_ids": ids, "category_ids": cat_ids, "context_mask": mask, "category_mask": cat_mask}


class CoReObjective(EmbeddingObjective):
    """L_diffusion + lambda_emb L_emb + lambda_attn L_attn (Eq. 5); a weight of 0 leaves its term (and its passes)
    out, as test-time optimization does with the diffusion loss."""

    def __init__(self, pipe, placeholder: PlaceholderVectors, diffusion: float, embedding: float, attention: float):
        super().__init__(pipe, placeholder)
        self.weights = {"diffusion": diffusion, "embedding": embedding, "attention": attention}
        self.layers = select_layers(self.unet, "cross") if attention else []

    def _token_attention(self, z_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        recorder = AttentionRecorder("probs", grad=hidden.requires_grad)
        with recording(self.unet, self.layers, recorder), recorder.capture():
            self.unet(z_t, t, hidden.to(self.unet.dtype))
        return token_attention(recorder.take())

    def forward(self, batch: dict) -> torch.Tensor:
        w = self.weights
        z_t, t, target = noised_batch(self.unet, self.vae, self.scheduler, batch)
        loss = z_t.new_zeros((), dtype=torch.float32)
        if w["diffusion"]:
            pred = self.unet(z_t, t, self.text_encoder(batch["input_ids"])[0].to(self.unet.dtype)).sample
            loss = loss + w["diffusion"] * F.mse_loss(pred.float(), target.float())
        if w["embedding"] or w["attention"]:
            hidden = self.text_encoder(batch["context_ids"])[0]
            with torch.no_grad():
                category = self.text_encoder(batch["category_ids"])[0]
            masks = batch["context_mask"], batch["category_mask"]
            if w["embedding"]:
                loss = loss + w["embedding"] * context_embedding_loss(hidden, category, *masks)
            if w["attention"]:
                with torch.no_grad():
                    target_maps = self._token_attention(z_t, t, category)
                maps = self._token_attention(z_t, t, hidden)
                loss = loss + w["attention"] * context_attention_loss(maps, target_maps, *masks)
        return loss


def rescaling_update(window: range):
    """The default update, then Eq. 6 on the steps of ``window``: each vector keeps the norm it had before it."""

    def update(ctx: StepContext) -> torch.Tensor:
        vectors = ctx.core.placeholder.vectors
        norms = vectors.detach().norm(dim=-1, keepdim=True)
        loss = gradient_step(ctx)
        if ctx.step in window:
            with torch.no_grad():
                vectors.copy_(rescale_to(vectors, norms))
        return loss

    return update


def _objective(pipe, config: CoReConfig, placeholder: PlaceholderVectors, diffusion: float = 1.0) -> CoReObjective:
    return CoReObjective(pipe, placeholder, diffusion, config.embedding_weight, config.attention_weight)


def _contexts(pipe, config: CoReConfig, seed: int, templates: list[str]):
    """The sampler of each sample's context (its token ids and masks)."""
    names = placeholder_names(config.placeholder_token, config.num_vectors)
    contexts = Contexts(pipe.tokenizer, templates, names, config.initializer_token)
    return lambda step, index: contexts.sample(seed, step, index)


def train_token(pipe, config: CoReConfig, train: TrainConfig, **fit_kwargs) -> Path:
    """Stage 1: the token from the category word's embedding under Eq. 5, the norm held in the window (Eq. 6)."""
    single_token_id(pipe.tokenizer, config.initializer_token)  # fail before any work
    templates = config.contexts()

    def init(placeholder: PlaceholderVectors) -> torch.Tensor:
        return initializer_vectors(pipe.text_encoder, pipe.tokenizer, config.initializer_token, config.num_vectors)

    regularized = config.embedding_weight or config.attention_weight
    return train_embedding(
        pipe,
        config,
        train,
        init,
        objective=lambda placeholder: _objective(pipe, config, placeholder),
        extra=(lambda: _contexts(pipe, config, train.seed, templates)) if regularized else None,
        update=rescaling_update(config.rescale_window(train.max_train_steps)),
        **fit_kwargs,
    )


def _stage(train: TrainConfig, folder: str, steps: int, learning_rate: float, **changes) -> TrainConfig:
    """A later stage's settings: its own checkpoints in ``folder`` of the run, resumed when the run is."""
    return dataclasses.replace(
        train,
        output_dir=str(Path(train.output_dir) / folder),
        max_train_steps=steps,
        learning_rate=learning_rate,
        validation_steps=0,
        resume_from_checkpoint="latest" if train.resume_from_checkpoint else None,
        **changes,
    )


def tune_unet(pipe, config: CoReConfig, train: TrainConfig, **fit_kwargs) -> Path | None:
    """Stage 2: the token frozen, a copy of the UNet (then ``pipe.unet``) fine-tuned on the subject's images with the
    diffusion loss, whole or LoRA on every transformer block; returns the saved ``unet/`` folder or LoRA weights file
    (None when stopped: the stage's checkpoint resumes it)."""
    out = Path(train.output_dir)
    # A whole UNet's checkpoint holds it and its optimizer state: keep one unless told otherwise.
    limit = train.checkpoints_total_limit or 1
    stage = _stage(
        train,
        UNET_STAGE,
        config.unet_steps,
        config.unet_learning_rate,
        max_grad_norm=1.0,
        checkpoints_total_limit=limit,
    )
    data = config.read(pipe, config.learnable_property)
    names = " ".join(placeholder_names(config.placeholder_token, config.num_vectors))
    settings = {"method": "core-unet", "rank": config.unet_lora_rank, "token": config.placeholder_token}

    def sample(step: int, index: int) -> dict:
        return data.sample(pipe.tokenizer, stage.seed, step, index, names)

    return fine_tune_unet(pipe, sample, stage, out, config.unet_lora_rank, settings, **fit_kwargs)


def tune_for_prompt(pipe, config: CoReConfig, train: TrainConfig, prompt: str, **fit_kwargs) -> Path:
    """Tunes a learnt token, already loaded in ``pipe`` (``pipe.load_textual_inversion``), for one prompt with ``{}``:
    Eq. 5 without the diffusion loss and ``prompt`` the only context; no rescaling (the paper's test-time step).
    Returns the new ``learned_embeds.safetensors`` in ``train.output_dir``."""
    check_context(prompt, "the test-time prompt")
    if not (config.embedding_weight or config.attention_weight):
        raise ValueError("test-time optimization needs a regularizer: set embedding_weight or attention_weight > 0")
    names = placeholder_names(config.placeholder_token, config.num_vectors)
    vocab = pipe.tokenizer.get_vocab()
    more = placeholder_names(config.placeholder_token, config.num_vectors + 1)[-1]
    if any(name not in vocab for name in names) or more in vocab:
        raise ValueError(
            f"{config.placeholder_token!r} with {config.num_vectors} vectors is not what this pipeline holds: load "
            "the learnt token first (pipe.load_textual_inversion(path)) and pass its --num_vectors"
        )
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    placeholder = PlaceholderVectors(pipe.text_encoder, ids, pipe.text_encoder.get_input_embeddings().weight[ids])
    data = config.read(pipe, config.learnable_property)
    objective = _objective(pipe, config, placeholder, diffusion=0.0)
    extra = _contexts(pipe, config, train.seed, [prompt])
    return fit_vectors(pipe, placeholder, objective, data, config, train, extra, **fit_kwargs)


def train_core(pipe, config: CoReConfig, train: TrainConfig, should_stop=None, on_step=None, **fit_kwargs) -> Path:
    """CoRe: stage 1, then stage 2 when ``unet_steps`` and test-time optimization when ``tto_prompt`` is given.
    Returns the token's ``learned_embeds.safetensors`` (the test-time one when optimized for a prompt); stage 2's
    ``unet/`` folder or ``pytorch_lora_weights.safetensors`` is written beside the stage-1 token.

    ``on_step`` counts on across the stages (stage 2's first step is ``max_train_steps + 1``); once ``should_stop``
    has said stop, no later stage starts (each resumes from its checkpoint when the run is resumed)."""
    stopped = [False]

    def stop() -> bool:
        stopped[0] = stopped[0] or (should_stop is not None and should_stop())
        return stopped[0]

    def counted(offset: int):
        return None if on_step is None else (lambda step, loss: on_step(offset + step, loss))

    path = train_token(pipe, config, train, should_stop=stop, on_step=on_step, **fit_kwargs)
    if config.unet_steps and not stopped[0]:
        logger.info("stage 1 done; stage 2 fine-tunes the UNet for %d steps", config.unet_steps)
        tune_unet(pipe, config, train, should_stop=stop, on_step=counted(train.max_train_steps), **fit_kwargs)
    if config.tto_prompt and not stopped[0]:
        tto = _stage(train, TEST_TIME, config.tto_steps, config.tto_learning_rate)
        offset = train.max_train_steps + config.unet_steps
        path = tune_for_prompt(
            pipe, config, tto, config.tto_prompt, should_stop=stop, on_step=counted(offset), **fit_kwargs
        )
    return path

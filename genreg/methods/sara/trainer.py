"""Fine-tuning a model's UNet with SaRA on the shared training loop: L = L_diffusion + lambda_rank ||P (.) M||_*
(Hu et al., ICLR 2025, Eq. 5), AdamW on the selected entries, re-selection at ``progressive_fraction`` of the steps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...config import option
from ...diffusion import FineTuneObjective
from ...io import image_grid, save_image
from ...training import TrainConfig, fit, gradient_step, process_state
from ...training.data import ImageDataConfig, check_caption
from .optim import SaRAAdamW, eligible_for_rank_loss, mask_frozen_gradients, pick_rank_layer, rank_loss
from .sparse import DELTA_FILE, SaRAConfig, auto_learning_rate, prepare, sparse_layers


@dataclass
class SaRATrainingConfig(ImageDataConfig, SaRAConfig):
    """A SaRA fine-tune: the images (each with a caption) and SaRA's settings."""

    validation_prompt: str | None = option(
        None, "a prompt sampled every --validation_steps to watch the model change", place="advanced"
    )

    def __post_init__(self):
        ImageDataConfig.__post_init__(self)
        SaRAConfig.__post_init__(self)
        if self.validation_prompt is not None:
            check_caption(self.validation_prompt, "validation_prompt")


def sara_settings(config: SaRAConfig) -> SaRAConfig:
    """The SaRA part of a training config, as ``prepare`` takes it."""
    return SaRAConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(SaRAConfig)})


def sara_optimizers(params, train: TrainConfig, lr: float) -> dict[str, torch.optim.Optimizer]:
    betas = (train.adam_beta1, train.adam_beta2)
    optimizer = SaRAAdamW(params, lr, betas=betas, eps=train.adam_epsilon, weight_decay=train.adam_weight_decay)
    return {"default": optimizer}


def train_sara(pipe, config: SaRATrainingConfig, train: TrainConfig, **fit_kwargs) -> Path:
    """Fine-tunes ``pipe.unet`` with SaRA; returns the path of ``sara_delta.safetensors`` in ``train.output_dir``.

    ``train.learning_rate`` None takes the paper's 1e-3 exp(-350 threshold). Each ``checkpoint-N/`` holds the delta
    too. ``pipe.unet`` is left as it was, whether training ends or fails: ``load_into(pipe, path)`` or ``merged``
    samples with the update."""
    data = config.read(pipe)
    uncaptioned = sum(item.caption is None for item in data.items)
    if uncaptioned:
        raise ValueError(
            f"{uncaptioned} of {len(data)} images in {config.train_data_dir} have no caption: fine-tuning learns "
            "from captions (metadata.jsonl rows or a .txt file beside each image)"
        )
    if train.learning_rate is None:
        train = dataclasses.replace(train, learning_rate=auto_learning_rate(config.threshold))
    sara = prepare(pipe.unet, sara_settings(config))
    layers = sparse_layers(pipe.unet)
    eligible = eligible_for_rank_loss(layers, config.rank_min_dim)
    reselect_at = int(config.progressive_fraction * train.max_train_steps) if config.progressive_fraction else -1
    objective = FineTuneObjective(pipe).to(pipe.device)
    run_settings = {"method": "sara", **dataclasses.asdict(sara_settings(config)), "resolution": config.resolution}

    def update(ctx) -> torch.Tensor:
        optimizer = getattr(ctx.optimizers["default"], "optimizer", ctx.optimizers["default"])  # accelerate's wrapper
        if ctx.step == reselect_at:
            optimizer.reselect(config.threshold)
        name = pick_rank_layer(eligible, train.seed, ctx.step) if config.lambda_rank > 0 else None

        def penalty() -> torch.Tensor:
            layer = layers[name]
            return config.lambda_rank * rank_loss(layer, optimizer.active(layer.values))

        return gradient_step(
            ctx, extra_loss=penalty if name else None, before_clip=lambda: mask_frozen_gradients(optimizer)
        )

    def export(core: nn.Module, directory: Path) -> None:
        sara.delta().save(directory / DELTA_FILE)

    def validate(core: nn.Module, step: int) -> None:
        generator = torch.Generator().manual_seed(train.seed)
        images = pipe([config.validation_prompt] * 4, num_inference_steps=25, generator=generator).images
        save_image(image_grid(images), Path(train.output_dir) / "validation" / f"step-{step}.png")

    try:
        fit(
            objective,
            lambda step, index: data.sample(pipe.tokenizer, train.seed, step, index),
            train,
            optimizers=sara_optimizers,
            update=update,
            export=export,
            settings=run_settings,
            validate=validate if config.validation_prompt else None,
            **fit_kwargs,
        )
    except BaseException:
        sara.unload()  # a failed run leaves the UNet as it found it
        raise
    path = Path(train.output_dir) / DELTA_FILE
    if process_state().is_main_process:
        sara.save_pretrained(train.output_dir)
    sara.unload()
    return path

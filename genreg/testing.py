"""Tiny random-weight components of the SD 1.x and SDXL architectures, built offline in code, for tests.

Each function returns the keyword arguments of the matching diffusers pipeline, e.g.
``StableDiffusionPipeline(**tiny_sd_components())``. Weights are seeded, so results are deterministic.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tinyworld.architecture import build_tokenizer


def _text_config(vocab_size: int, hidden: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _tiny_unet(**config) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **config,
    )


def tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD's scheduler settings (scaled-linear betas, leading spacing, steps_offset=1)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_sd_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """SD 1.x-style components (``prediction_type="v_prediction"`` gives an SD 2.x-style model); 32x32 images."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(max_length=77)
    unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=2)
    return {
        "unet": unet,
        "vae": _tiny_vae(),
        "text_encoder": CLIPTextModel(_text_config(len(tokenizer))),
        "tokenizer": tokenizer,
        "scheduler": tiny_scheduler(prediction_type),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def tiny_sdxl_components(seed: int = 0) -> dict:
    """SDXL-style components: two text encoders (the second with a projection), text-time conditioning; 32x32."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(max_length=77)
    unet = _tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six micro-conditions + the pooled text embedding
        cross_attention_dim=64,  # the two encoders' hidden states, concatenated
    )
    return {
        "unet": unet,
        "vae": _tiny_vae(),
        "text_encoder": CLIPTextModel(_text_config(len(tokenizer))),
        "text_encoder_2": CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        "tokenizer": tokenizer,
        "tokenizer_2": build_tokenizer(max_length=77),
        "scheduler": tiny_scheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }

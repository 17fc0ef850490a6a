"""Tiny random-weight components of the SD 1.x and SDXL architectures, built offline in code, for tests.

Each function returns the keyword arguments of the matching diffusers pipeline, e.g.
``StableDiffusionPipeline(**tiny_sd_components())``. Weights are seeded, so results are deterministic.
``original_sd_state_dict`` writes an SD 1.x pipeline's weights in the original single-file key layout.
"""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
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


def tiny_motion_adapter(seed: int = 0) -> MotionAdapter:
    """An AnimateDiff motion adapter for ``tiny_sd_components``' UNet (widths 8, 16): ``AnimateDiffPipeline.from_pipe(
    StableDiffusionPipeline(**tiny_sd_components()), motion_adapter=tiny_motion_adapter())``."""
    torch.manual_seed(seed)
    return MotionAdapter(
        block_out_channels=(8, 16),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=4,
        motion_max_seq_length=32,
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


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A ``StableDiffusionPipeline`` of :func:`tiny_sd_components`, its progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(seed, prediction_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


_RESNET_TO_ORIGINAL = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION_TO_ORIGINAL = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(key: str, config) -> str:
    """The original (LDM) name of a diffusers UNet2DConditionModel weight: the inverse of diffusers' conversion."""
    per_block = config.layers_per_block + 1  # an up block has one resnet more than a down block
    resnet = lambda rest: re.sub(r"^[a-z_0-9]+", lambda m: _RESNET_TO_ORIGINAL[m[0]], rest)  # noqa: E731
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        inner = f"0.{resnet(rest)}" if kind == "resnets" else f"1.{rest}"
        return f"input_blocks.{1 + block * per_block + layer}.{inner}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_block + config.layers_per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        inner = f"0.{resnet(rest)}" if kind == "resnets" else f"1.{rest}"
        return f"output_blocks.{block * per_block + layer}.{inner}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if "CrossAttn" in config.up_block_types[block] else 1  # after the attention, if the block has one
        return f"output_blocks.{block * per_block + config.layers_per_block}.{slot}.conv.{m[2]}"
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    name, _, leaf = key.rpartition(".")
    return f"{top[name]}.{leaf}"


def _vae_key(key: str, config) -> str:
    """The original (LDM) name of a diffusers AutoencoderKL weight; the decoder's up blocks are numbered backwards."""
    last = len(config.up_block_types) - 1
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"\.resnets\.(\d+)\.conv_shortcut\.", r".resnets.\1.nin_shortcut.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{last - int(m[1])}.block.", key)
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{last - int(m[1])}.upsample.", key
    )
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    return re.sub(
        r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
        lambda m: f".mid.attn_1.{_VAE_ATTENTION_TO_ORIGINAL[m[1]]}.",
        key,
    )


def original_sd_state_dict(pipe) -> dict[str, torch.Tensor]:
    """An SD 1.x pipeline's UNet, VAE and CLIP text encoder in one state dict with the original single-file names."""
    unet = {f"model.diffusion_model.{_unet_key(k, pipe.unet.config)}": v for k, v in pipe.unet.state_dict().items()}
    vae = {}
    for key, value in pipe.vae.state_dict().items():
        name = _vae_key(key, pipe.vae.config)
        is_attention_matrix = ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2
        vae[f"first_stage_model.{name}"] = value[..., None, None] if is_attention_matrix else value  # 1x1 convs there
    text = {  # the transformers 4 layout (CLIPTextModel wraps a text_model), as single files hold it
        f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v
        for k, v in pipe.text_encoder.state_dict().items()
    }
    return {k: v.detach().contiguous() for k, v in {**unet, **vae, **text}.items()}

"""The bundled model's components: Stable Diffusion's architecture at tiny-world scale, built offline in code."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .world import VOCABULARY_ADDITIONS, vocabulary

MAX_PROMPT_TOKENS = 32
LATENT_CHANNELS = 4
TEXT_HIDDEN = 64


def _learn_merges(words: list[str], known: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Byte-pair merges that make every word one token: ``known`` merges are applied first, then new ones are
    learnt, the most frequent adjacent pair first, ties by string order; returns the new merges.

    Written out (rather than using a BPE trainer) so the merges, hence the token ids, are the same on every run."""
    pieces = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []

    def apply(pair: tuple[str, str]) -> None:
        for i, p in enumerate(pieces):
            j, out = 0, []
            while j < len(p):
                if j + 1 < len(p) and (p[j], p[j + 1]) == pair:
                    out.append(p[j] + p[j + 1])
                    j += 2
                else:
                    out.append(p[j])
                    j += 1
            pieces[i] = out

    for pair in known:
        apply(pair)
    while True:
        counts: dict[tuple[str, str], int] = {}
        for p in pieces:
            for pair in zip(p, p[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        apply(best)


def build_tokenizer(max_length: int = MAX_PROMPT_TOKENS, vocab_size: int | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges make every tiny-world word one token; other text falls back to bytes.

    Built offline and deterministically (same ids on every build). New tokens can be added
    (``load_textual_inversion``) as with any CLIP tokenizer. ``vocab_size`` pads the vocabulary with unused entries
    (``<unusedN>``) to that size, e.g. CLIP's 49,408 for a text encoder of real size.
    """
    alphabet = list(bytes_to_unicode().values())
    added = sum(len(group) for group in VOCABULARY_ADDITIONS)
    merges = _learn_merges(vocabulary()[:-added])
    for group in VOCABULARY_ADDITIONS:  # appended group by group: earlier ids never change
        merges += _learn_merges(list(group), merges)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab)} entries the tiny world needs")
        vocab |= {f"<unused{i}>": i for i in range(len(vocab), vocab_size)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    """64x64x3 images <-> 16x16x4 latents (two downsamplings), as SD's VAE but narrower."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
    )


@torch.no_grad()
def standardize_latent_channels(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Folds z' = (z - mean) / std per channel into the VAE's 1x1 quant convs, in place: the same autoencoder, whose
    latents now have unit variance in every channel (as EDM2 normalises SD latents), loadable by plain diffusers.

    A single scaling factor cannot do this, and this VAE's channels differ ~12x in spread (one mostly encodes the
    background): at any noise level the object channels then carry far less signal than the schedule assumes."""
    mean, std = mean.double(), std.double()
    enc, dec = vae.quant_conv, vae.post_quant_conv
    n = len(mean)
    w, b = enc.weight.double(), enc.bias.double()
    w[:n] /= std.view(-1, 1, 1, 1)
    b[:n] = (b[:n] - mean) / std
    b[n:] -= 2 * std.log()  # log-variance of z' = log-variance of z - 2 log std
    enc.weight.copy_(w), enc.bias.copy_(b)
    w, b = dec.weight.double(), dec.bias.double()
    b += w[:, :, 0, 0] @ mean
    w *= std.view(1, -1, 1, 1)
    dec.weight.copy_(w), dec.bias.copy_(b)


# Tiny World 2's UNet layout: the defaults of ``build_unet`` and of the training script's layout flags.
UNET_LAYOUT = {"widths": (32, 64, 128), "attention": (True, True, True), "heads": (1, 4, 4)}


def build_unet(
    widths: tuple[int, ...] = UNET_LAYOUT["widths"],
    attention: tuple[bool, ...] = UNET_LAYOUT["attention"],
    heads: int | tuple[int, ...] = UNET_LAYOUT["heads"],
) -> UNet2DConditionModel:
    """SD's UNet2DConditionModel at tiny-world scale: one level per width (16x16, 8x8, 4x4 latents), transformer
    blocks (self- and cross-attention) at the levels ``attention`` marks, cross-attention in the middle.

    The default is Tiny World 2's: transformer blocks at the top latent resolution (16x16) as SD 1.x places them,
    where SD's self-attention carries the layout and detail that attention-based editing (Guide-and-Rescale's
    energies) and personalization act on, and at the two levels below. With a convolutional 96-wide lowest level
    (``build_unet((32, 64, 96), (True, True, False), 2)``) shape stayed at chance for 5,000 steps of the recipe; this
    layout read it at 0.84 by 8,000 (README). Tiny World 1's UNet (the bundled model before) is
    ``build_unet((32, 64, 128), (False, True, True), 4)``. On a two-core CPU, 8-wide heads at the top level cost 1.5x
    more per step than one 32-wide head (SDPA's CPU kernel)."""
    heads = (heads,) * len(widths) if isinstance(heads, int) else tuple(heads)
    if not len(widths) == len(attention) == len(heads):
        raise ValueError(f"one attention flag and head count per level: widths {widths}, {attention}, heads {heads}")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=tuple(widths),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=16,
    )


def build_motion_adapter(widths: tuple[int, ...] = UNET_LAYOUT["widths"]) -> MotionAdapter:
    """AnimateDiff's motion adapter for the bundled UNet: one temporal transformer after every resnet/attention pair of
    every level and in the middle (as AnimateDiff v2), 16-wide heads, sinusoidal frame positions up to 32 frames."""
    return MotionAdapter(
        block_out_channels=tuple(widths),
        motion_layers_per_block=1,
        motion_num_attention_heads=tuple(max(w // 16, 1) for w in widths),
        motion_norm_num_groups=16,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )


@torch.no_grad()
def zero_residual_outputs(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Starts the UNet as SD's own training code (ldm) did: the last layer of every residual branch (each resnet's
    conv2, each transformer block's proj_out) and the output conv at zero, so every block begins as the identity.

    diffusers keeps PyTorch's default init (its models are made to load weights); trained from it, transformer blocks
    at the top level add a random perturbation at every step of every image from the first update on."""
    for name, module in unet.named_modules():
        if name == "conv_out" or name.endswith((".conv2", ".proj_out")):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    return unet


def build_scheduler(prediction_type: str = "v_prediction") -> DDIMScheduler:
    """DDPM's linear betas (terminal SNR ~4e-5, so little colour or position leaks through the last step);
    no sample clipping (latents are not bounded to [-1, 1]); trailing spacing so sampling starts at t = 999.

    v-prediction by default: at high noise an epsilon loss weighs the clean image by SNR ~ 0, so the layout, which
    is decided there, is barely learnt; v keeps weight ~1 on x0 at every noise level."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
        steps_offset=1,
        prediction_type=prediction_type,
    )

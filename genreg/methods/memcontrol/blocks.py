"""MemControl's search space (Dutt et al., WACV 2025): a binary mask over the UNet's transformer blocks, each
selected block fine-tuned with a PEFT adapter on its attention projections (LoRA), or IA3-style scales on them and on
its feed-forward output (close to DiffFit's gamma placement); every other weight stays frozen."""

from __future__ import annotations

import re

from torch import nn

FAMILIES = ("lora", "ia3")
PROJECTIONS = r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"


def attention_blocks(unet: nn.Module) -> list[str]:
    """The names of the UNet's transformer blocks (``Transformer2DModel``s), in forward order; SD 1.5 has 16."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [name for name, module in unet.named_modules() if isinstance(module, Transformer2DModel)]


def selected(blocks: list[str], mask: list[int] | tuple[int, ...]) -> list[str]:
    """The blocks a mask selects; an empty or mis-sized mask is refused."""
    if len(mask) != len(blocks):
        raise ValueError(f"the mask has {len(mask)} bits, this UNet {len(blocks)} transformer blocks: {blocks}")
    if any(bit not in (0, 1) for bit in mask):
        raise ValueError(f"a mask holds 0s and 1s, got {list(mask)}")
    chosen = [block for block, bit in zip(blocks, mask, strict=True) if bit]
    if not chosen:
        raise ValueError("the mask selects no block, so nothing would be trained: set at least one bit")
    return chosen


def target_pattern(blocks: list[str], suffix: str = PROJECTIONS) -> str:
    """A regex PEFT matches in full: ``suffix`` modules inside the given blocks."""
    return rf"^({'|'.join(re.escape(b) for b in blocks)})\.transformer_blocks\.\d+\.{suffix}$"


def add_adapter(unet: nn.Module, mask, family: str = "lora", rank: int = 4) -> int:
    """Adds the family's adapter to the blocks ``mask`` selects (the rest frozen); returns the trainable count."""
    from peft import IA3Config, LoraConfig

    chosen = selected(attention_blocks(unet), mask)
    if family == "lora":
        config = LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_pattern(chosen)
        )
    elif family == "ia3":
        ff = r"ff\.net\.2"
        config = IA3Config(
            target_modules=target_pattern(chosen, f"({PROJECTIONS}|{ff})"),
            feedforward_modules=target_pattern(chosen, ff),
        )
    else:
        raise ValueError(f"unknown adapter family {family!r}; choose one of {', '.join(FAMILIES)}")
    unet.requires_grad_(False)
    unet.add_adapter(config)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)

"""PEFT adapters on a UNet's transformer blocks, shared by the methods that fine-tune through them (MemControl's
search space, CoRe's stage 2 and HiFi Tuner's DreamBooth variant with LoRA): which blocks, the adapter, the saved
result and applying it for a while; and ``fine_tune_unet``, a copy of the UNet fine-tuned whole or with LoRA.

A binary mask over the UNet's transformer blocks selects where an adapter goes: LoRA on the attention projections
(and, with ``modules="attention+ff"``, the feed-forward layers), or IA3-style scales on the projections and the
feed-forward output (close to DiffFit's gamma placement); every other weight stays frozen. Results load with the
standard tools: LoRA as diffusers LoRA weights (``pipe.load_lora_weights(out)``), IA3 merged
into a plain diffusers ``unet/`` folder (``UNet2DConditionModel.from_pretrained(out, subfolder="unet")``).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .io import atomic_write

FAMILIES = ("lora", "ia3")
LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "genreg"
PROJECTIONS = r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
FEED_FORWARD = r"ff\.net\.(0\.proj|2)"
LORA_MODULES = {"attention": PROJECTIONS, "attention+ff": f"({PROJECTIONS}|{FEED_FORWARD})"}


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


def add_adapter(unet: nn.Module, mask, family: str = "lora", rank: int = 4, modules: str = "attention") -> int:
    """Adds the family's adapter to the blocks ``mask`` selects (LoRA on ``modules``, a key of LORA_MODULES; the rest
    frozen, the adapter in float32 whatever the UNet's dtype, as fp16 mixed precision needs); returns the trainable
    count."""
    from diffusers.training_utils import cast_training_params
    from peft import IA3Config, LoraConfig

    chosen = selected(attention_blocks(unet), mask)
    if modules not in LORA_MODULES:
        raise ValueError(f"unknown LoRA modules {modules!r}; choose one of {', '.join(LORA_MODULES)}")
    if family == "lora":
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=target_pattern(chosen, LORA_MODULES[modules]),
        )
    elif family == "ia3":
        ff = r"ff\.net\.2"  # IA3 scales the feed-forward output only
        config = IA3Config(
            target_modules=target_pattern(chosen, f"({PROJECTIONS}|{ff})"),
            feedforward_modules=target_pattern(chosen, ff),
        )
    else:
        raise ValueError(f"unknown adapter family {family!r}; choose one of {', '.join(FAMILIES)}")
    unet.requires_grad_(False)
    unet.add_adapter(config)
    cast_training_params(unet, dtype=torch.float32)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def save_result(pipe, family: str, output_dir: Path) -> Path:
    """LoRA: ``pytorch_lora_weights.safetensors``; IA3: the scales merged into a plain ``unet/`` folder."""
    from peft.utils import get_peft_model_state_dict

    output_dir.mkdir(parents=True, exist_ok=True)
    if family == "lora":
        layers = get_peft_model_state_dict(pipe.unet)
        type(pipe).save_lora_weights(output_dir, unet_lora_layers=layers, safe_serialization=True)
        return output_dir / LORA_FILE
    for module in pipe.unet.modules():  # peft's tuner layers merge their scales into the base weight
        if hasattr(module, "merge") and hasattr(module, "base_layer"):
            module.merge()
    plain = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "ia3_l" not in k}
    unet = type(pipe.unet).from_config(pipe.unet.config)
    unet.load_state_dict(plain)
    atomic_write(output_dir / "unet", lambda tmp: unet.save_pretrained(tmp, safe_serialization=True))
    return output_dir / "unet"


@contextlib.contextmanager
def applied(unet: nn.Module, result: str | Path, alpha: float = 1.0) -> Iterator[nn.Module]:
    """``unet`` with a stage-2 result (LoRA weights or a merged ``unet/``) at strength ``alpha``, and exactly as it
    was after the block."""
    result = Path(result)
    if result.is_file():
        flags = {name: p.requires_grad for name, p in unet.named_parameters()}
        unet.load_lora_adapter(str(result), adapter_name=ADAPTER, prefix="unet")
        try:
            unet.set_adapters([ADAPTER], weights=[alpha])
            yield unet
        finally:
            unet.delete_adapters(ADAPTER)
            if not getattr(unet, "peft_config", None):  # no other adapter: the plain modules back
                unet.unload_lora()
            for name, p in unet.named_parameters():  # loading an adapter freezes the base weights
                p.requires_grad_(flags.get(name, p.requires_grad))
        return
    from safetensors.torch import load_file

    tuned = load_file(str(result / "diffusion_pytorch_model.safetensors"))
    changed = {k: p for k, p in unet.state_dict().items() if k in tuned and not torch.equal(p, tuned[k].to(p))}
    saved = {k: p.clone() for k, p in changed.items()}
    with torch.no_grad():
        for k, p in changed.items():
            p.lerp_(tuned[k].to(p), alpha)
    try:
        yield unet
    finally:
        with torch.no_grad():
            for k, p in changed.items():
                p.copy_(saved[k])


def fine_tune_unet(
    pipe, sample: Callable, stage, out: Path, lora_rank: int, settings: dict, masked: bool = False, **fit_kwargs
) -> Path | None:
    """Fine-tunes a copy of ``pipe.unet`` (then ``pipe.unet``: a UNet the caller shares, the app's model, stays as it
    was) on ``sample``'s batches under the diffusion loss, weighted by their masks with ``masked``, whole or with LoRA
    of ``lora_rank`` on every transformer block, by the shared loop with ``stage`` (a TrainConfig). Saves and returns
    ``out/unet`` or ``out/pytorch_lora_weights.safetensors``; None when stopped (the stage's checkpoint resumes it)."""
    from diffusers.training_utils import cast_training_params

    from .diffusion import FineTuneObjective
    from .training import fit, process_state

    pipe.unet = unet = copy.deepcopy(pipe.unet)
    if lora_rank:
        add_adapter(unet, [1] * len(attention_blocks(unet)), "lora", lora_rank)
    else:
        unet.requires_grad_(True)
        cast_training_params(unet, dtype=torch.float32)  # trained weights in fp32 under fp16/bf16 autocast
    objective = FineTuneObjective(pipe, masked).to(pipe.device)
    result = fit(objective, sample, stage, settings=settings, **fit_kwargs)
    unet.requires_grad_(False)
    if result.stopped:
        return None
    if not process_state().is_main_process:
        return out / (LORA_FILE if lora_rank else "unet")
    if lora_rank:
        return save_result(pipe, "lora", out)
    return atomic_write(out / "unet", lambda tmp: unet.save_pretrained(tmp, safe_serialization=True))

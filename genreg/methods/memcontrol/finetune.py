"""MemControl's stage 2 (Dutt et al., WACV 2025): fine-tune with one mask of the search's Pareto front (or a mask
given bit by bit), on the shared loop; the result loads with the standard tools.

LoRA is saved as diffusers LoRA weights (``pipe.load_lora_weights(out)``); IA3 scales are merged into the UNet, saved
as a plain diffusers ``unet/`` folder (``UNet2DConditionModel.from_pretrained(out, subfolder="unet")``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...config import option
from ...io import atomic_write
from ...training import TrainConfig
from ...training.data import ImageDataConfig
from .blocks import FAMILIES
from .search import QUALITIES, tune_copy

LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "memcontrol"


def parse_mask(text: str) -> list[int]:
    """ "0,1,1,0" or "0110" -> [0, 1, 1, 0]."""
    bits = text.replace(",", " ").split() if ("," in text or " " in text) else list(text.strip())
    if not bits or any(b not in ("0", "1") for b in bits):
        raise ValueError(f"a mask is 0s and 1s, one per transformer block, e.g. 0,1,1,0; got {text!r}")
    return [int(b) for b in bits]


def quality_key(row: dict) -> str:
    """The name of a Pareto row's quality objective (``frechet_distance`` or ``error_rate``)."""
    return next(name for name in QUALITIES.values() if name in row)


def knee(rows: list[dict]) -> dict:
    """The Pareto row with the smallest sum of its two objectives, each scaled to [0, 1] over the front."""
    keys = ("memorization", quality_key(rows[0]))
    lows = {k: min(r[k] for r in rows) for k in keys}
    spans = {k: (max(r[k] for r in rows) - lows[k]) or 1.0 for k in keys}
    return min(rows, key=lambda r: sum((r[k] - lows[k]) / spans[k] for k in keys))


def choose(pareto: str | Path, trial: int | None = None) -> dict:
    """A row of a search's ``pareto.json``: trial ``trial`` (any finished one), or the front's knee."""
    path = Path(pareto)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the pareto.json a MemControl search wrote")
    rows = json.loads(path.read_text())["trials"]
    if trial is None:
        return knee([r for r in rows if r["pareto"]])
    found = [r for r in rows if r["trial"] == trial]
    if not found:
        raise ValueError(f"{path} has no finished trial {trial}; its trials are {[r['trial'] for r in rows]}")
    return found[0]


@dataclass
class MemControlFinetuneConfig(ImageDataConfig):
    """Stage 2: the images, and the mask (from a search's Pareto front or given) with its adapter family."""

    pareto: str = option(
        "", "a search's pareto.json: fine-tune with its knee's mask and learning rate, or --trial's", place="hidden"
    )
    trial: int | None = option(
        None, "with --pareto: the trial whose mask to use (default: the front's knee)", place="hidden"
    )
    mask: str = option("", "the mask itself, one bit per transformer block (e.g. 0,1,1,0); instead of --pareto")
    family: str = option("lora", "adapter on the selected blocks", choices=FAMILIES)
    lora_rank: int = option(4, "LoRA rank", place="advanced")
    flip_p: float = option(0.0, "probability of a horizontal flip (0: captions may name left/right)", place="advanced")

    def __post_init__(self):
        super().__post_init__()
        if bool(self.pareto) == bool(self.mask):
            raise ValueError("pass either --pareto (a search's pareto.json) or --mask (e.g. 0,1,1,0), not both")
        if self.mask:
            parse_mask(self.mask)

    def resolve(self) -> tuple[list[int], float | None]:
        """(mask, the searched learning rate or None)."""
        if self.mask:
            return parse_mask(self.mask), None
        row = choose(self.pareto, self.trial)
        return row["mask"], row["learning_rate"]


def finetune_memcontrol(pipe, config: MemControlFinetuneConfig, train: TrainConfig, **fit_kwargs) -> Path:
    """Fine-tunes a copy of ``pipe.unet`` with the mask's adapters (the searched learning rate unless
    ``train.learning_rate`` is set); returns the saved result (LoRA weights file or ``unet/`` folder)."""
    mask, searched_lr = config.resolve()
    if train.learning_rate is None:
        train = dataclasses.replace(train, learning_rate=searched_lr or 1e-4)
    data = config.read(pipe)
    if any(item.caption is None for item in data.items):
        raise ValueError(f"every image in {config.train_data_dir} needs a caption (metadata.jsonl or a .txt file)")
    settings = {"method": "memcontrol-finetune", "mask": mask, "family": config.family, "rank": config.lora_rank}
    tuned, _, _ = tune_copy(pipe, data, mask, config.family, config.lora_rank, train, settings=settings, **fit_kwargs)
    return save_result(tuned, config.family, Path(train.output_dir))


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

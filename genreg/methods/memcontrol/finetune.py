"""MemControl's stage 2 (Dutt et al., WACV 2025): fine-tune with one mask of the search's Pareto front (or a mask
given bit by bit), on the shared loop; the result loads with the standard tools.

LoRA is saved as diffusers LoRA weights (``pipe.load_lora_weights(out)``); IA3 scales are merged into the UNet, saved
as a plain diffusers ``unet/`` folder (``UNet2DConditionModel.from_pretrained(out, subfolder="unet")``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ...adapters import FAMILIES, LORA_MODULES, save_result
from ...config import option
from ...training import TrainConfig
from ...training.data import ImageDataConfig
from .search import LORA_DEFAULT, LORA_MODULES_HELP, QUALITIES, adapter_setup, tune_copy


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


def choose(pareto: str | Path, trial: int | None = None, adapter: dict | None = None) -> dict:
    """A row of a search's ``pareto.json``: trial ``trial`` (any finished one), or the front's knee. A front searched
    with another adapter than ``adapter`` (``adapter_setup``'s keys) is refused."""
    path = Path(pareto)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the pareto.json a MemControl search wrote")
    front = json.loads(path.read_text())
    adapter = adapter or {}
    other = {k: v for k, v in (front.get("setup") or {}).items() if k in adapter and adapter[k] != v}
    if other:
        flags = " ".join(f"--{k} {v}" for k, v in other.items())
        raise ValueError(f"{path} was searched with another adapter: pass {flags} to fine-tune its masks")
    rows = front["trials"]
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
    lora_modules: str = option(LORA_DEFAULT, LORA_MODULES_HELP, choices=tuple(LORA_MODULES), place="advanced")
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
        row = choose(self.pareto, self.trial, adapter_setup(self))
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
    settings = {"method": "memcontrol-finetune", "mask": mask} | adapter_setup(config)
    tuned, _, _ = tune_copy(pipe, data, mask, config, train, settings=settings, **fit_kwargs)
    return save_result(tuned, config.family, Path(train.output_dir))

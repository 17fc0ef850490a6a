"""Training checkpoints: ``checkpoint-N/`` directories written atomically, in safetensors and JSON only.

A checkpoint holds the trainable tensors, each optimizer's state and the step. Nothing is pickled, so loading a
checkpoint never runs code from the file. The data order and the noise are pure functions of (seed, step, sample),
so the step alone restores them: resuming continues exactly where the run stopped.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..io import atomic_write

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = "optimizer"  # the one optimizer of most methods; its files keep the plain names
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str | None, output_dir: str | Path) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint in ``output_dir`` (None if there is none); a path -> itself."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / spec
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {spec!r}: pass 'latest' or a checkpoint-N directory")
    return path


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's ``state_dict()`` as safetensors-ready tensors ("{param}.{key}") and JSON-ready groups."""
    tensors = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of ``flatten_optimizer_state``: a dict ``optimizer.load_state_dict`` takes."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _optimizer_stem(name: str) -> str:
    return "optimizer" if name == DEFAULT_OPTIMIZER else f"optimizer-{name}"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_states: dict[str, dict],
    extra: dict | None = None,
    total_limit: int | None = None,
    export: Callable[[Path], None] | None = None,
) -> Path:
    """Writes ``checkpoint-{step}`` via a temporary directory and one rename: a crash leaves the old ones intact.

    ``optimizer_states`` maps each optimizer's name to its ``state_dict()``. ``export(directory)`` may add the
    method's own output files (e.g. ``learned_embeds.safetensors``) first.
    """
    root = Path(output_dir)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        for name, state in optimizer_states.items():
            tensors, meta = flatten_optimizer_state(state)
            stem = _optimizer_stem(name)
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"{stem}.safetensors"))
            (tmp / f"{stem}.json").write_text(json.dumps(meta))
        if export is not None:
            export(tmp)
        (tmp / "state.json").write_text(
            json.dumps({"step": step, "optimizers": list(optimizer_states), **(extra or {})}, indent=1)
        )

    try:
        final = atomic_write(root / f"checkpoint-{step}", write)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise OSError(
            errno.ENOSPC,
            f"no space left on the disk of {root} while writing checkpoint-{step}; the earlier checkpoints are intact:"
            " free some space and continue with --resume_from_checkpoint latest",
        ) from None
    if total_limit is not None:
        for old in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(old)
    return final


def load_latest_intact(output_dir: str | Path) -> tuple[Path, tuple] | None:
    """The newest checkpoint in ``output_dir`` that loads, with what ``load_checkpoint`` returns; a damaged one (a
    truncated file, say) is skipped with a warning that names it. None when there is none."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return path, load_checkpoint(path)
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            logger.warning("%s cannot be read (%s): falling back to the checkpoint before it", path, err)
    return None


def load_checkpoint(path: str | Path) -> tuple[int, dict[str, torch.Tensor], dict[str, dict], dict]:
    """(step, trainable tensors, optimizer state dicts by name, the state.json contents)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    trainable = load_file(str(path / "trainable.safetensors"))
    optimizers = {
        name: unflatten_optimizer_state(
            load_file(str(path / f"{_optimizer_stem(name)}.safetensors")),
            json.loads((path / f"{_optimizer_stem(name)}.json").read_text()),
        )
        for name in state.get("optimizers", [DEFAULT_OPTIMIZER])
    }
    return int(state["step"]), trainable, optimizers, state

"""Loading a text-to-image pipeline: the bundled `tinyworld`, a local diffusers directory, or a cached hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError

BUNDLED = ("tinyworld",)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this machine has, or an error that names the ones it has."""
    have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    have += ["mps"] if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else []
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {str(device)!r} is not a device name; this machine has {', '.join(have)}") from err
    if device.type not in have:
        raise ValueError(f"device {str(device)!r} is not available on this machine; it has {', '.join(have)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on accelerators (what SD checkpoints are run in), fp32 on the CPU."""
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Maps a model name to what ``from_pretrained`` takes, or raises with what to do instead."""
    name = str(name_or_path)
    if not name.strip():
        raise ValueError("no model given: pass 'tinyworld', a local diffusers directory, or a hub id")
    if name in BUNDLED:
        from .tinyworld import model_path

        return str(model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {path} is a file; pass the diffusers directory that holds model_index.json")
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"{path} is not a diffusers pipeline directory (no model_index.json); save one with "
                "pipe.save_pretrained(...) or convert a single-file checkpoint with "
                "StableDiffusionPipeline.from_single_file(...).save_pretrained(...)"
            )
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path or "/" not in name:
        raise FileNotFoundError(
            f"model {name!r} not found: it is neither a bundled model ({', '.join(BUNDLED)}), an existing directory, "
            "nor a hub id of the form 'owner/name'"
        )
    return name  # a hub id; from_pretrained looks in the local cache


def load_pipeline(
    name_or_path: str | os.PathLike = "tinyworld",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> DiffusionPipeline:
    """Loads a diffusers pipeline by name: ``"tinyworld"`` (bundled), a local directory, or a hub id from the cache.

    Nothing is downloaded: a hub id must already be in the local Hugging Face cache. ``device`` defaults to CUDA when
    available, else the CPU; ``dtype`` to fp16 on accelerators and fp32 on the CPU. Extra keyword arguments go to
    ``DiffusionPipeline.from_pretrained``.
    """
    device = check_device(device) if device is not None else default_device()
    source = resolve_model(name_or_path)
    dtype = dtype if dtype is not None else default_dtype(device)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, AttributeError, SafetensorError) as err:
        if Path(source).is_dir():  # a damaged directory: a truncated weights file, a bad index, a missing part
            raise ValueError(
                f"cannot load the model in {source} ({type(err).__name__}: {str(err).strip()[:300]}); a diffusers "
                "directory needs model_index.json and, for each component it names, a folder with its config and "
                "complete weights: copy it again, or re-save it with pipe.save_pretrained(...)"
            ) from err
        if not isinstance(err, OSError):
            raise
        raise FileNotFoundError(
            f"model {source!r} is not in the local Hugging Face cache, and genreg never downloads at run time. On a "
            f"machine with internet run `hf download {source}` and copy its cache folder "
            "(~/.cache/huggingface/hub, or $HF_HOME/hub) here, or pass a local diffusers directory instead"
        ) from err
    return pipe.to(device)

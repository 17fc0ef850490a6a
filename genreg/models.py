"""Loading a text-to-image pipeline: the bundled `tinyworld`, a local diffusers directory, a cached hub id, or a
single-file `.safetensors` checkpoint with the configs of a local diffusers directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import FromSingleFileMixin
from diffusers.loaders.single_file_utils import SingleFileComponentError
from safetensors import SafetensorError

BUNDLED = ("tinyworld",)
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # loading these runs the unpickler, which can run code
NEEDS_CONFIG = (
    "pass config= (on the command line --model-config): a local diffusers directory of the same architecture, e.g. "
    "the model's original repository folder (its model_index.json and component configs suffice), or 'tinyworld'"
)


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
    """Maps a model name to a diffusers directory, a hub id or a single file, or raises with what to do instead."""
    name = str(name_or_path)
    if not name.strip():
        raise ValueError("no model given: pass 'tinyworld', a diffusers directory, a hub id or a .safetensors file")
    if name in BUNDLED:
        from .tinyworld import model_path

        return str(model_path())
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            return check_single_file(path)
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"{path} is not a diffusers pipeline directory (no model_index.json); save one with "
                "pipe.save_pretrained(...), or pass a single-file checkpoint (.safetensors) itself with a config"
            )
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path or "/" not in name:
        raise FileNotFoundError(
            f"model {name!r} not found: it is neither a bundled model ({', '.join(BUNDLED)}), an existing directory "
            "or .safetensors file, nor a hub id of the form 'owner/name'"
        )
    return name  # a hub id; from_pretrained looks in the local cache


def check_single_file(path: Path) -> str:
    """``path`` if it is a ``.safetensors`` single-file checkpoint, or an error that says what to pass instead."""
    suffix = path.suffix.lower()
    if suffix in PICKLED_SUFFIXES:
        raise ValueError(
            f"{path} is a pickled checkpoint ({suffix}), and loading one can run code: genreg reads single-file "
            "checkpoints only as .safetensors. Convert it once (e.g. torch.load(path, weights_only=True) and "
            "safetensors.torch.save_file on its state dict) and pass the .safetensors file"
        )
    if suffix != ".safetensors":
        raise ValueError(
            f"model path {path} is a file but not a .safetensors checkpoint; pass a single-file checkpoint "
            "(.safetensors, with a config) or the diffusers directory that holds model_index.json"
        )
    return str(path)


def resolve_config(config: str | os.PathLike) -> str:
    """The local diffusers directory ``config`` names ('tinyworld' or a path), or an error that says what to pass."""
    name = str(config)
    if name in BUNDLED:
        return resolve_model(name)
    path = Path(name).expanduser()
    if not (path / "model_index.json").is_file():
        raise ValueError(f"config {name!r} is not a local diffusers directory (no model_index.json): {NEEDS_CONFIG}")
    return str(path)


def _no_meta_tensors(pipe: DiffusionPipeline, path: str, config: str) -> None:
    """Raises if a component kept weights the checkpoint did not hold (diffusers leaves them on the meta device)."""
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            missing = [k for k, v in module.state_dict().items() if v.is_meta]
            if missing:
                raise ValueError(
                    f"{path} lacks {len(missing)} of the {name}'s weights that the configs in {config} describe "
                    f"(e.g. {missing[0]}): pass the config of the model it was trained from"
                )


def load_single_file(path: str, config: str, dtype: torch.dtype, **kwargs) -> DiffusionPipeline:
    """A pipeline from a single-file checkpoint, with the configs, tokenizer and scheduler of directory ``config``."""
    class_name = DiffusionPipeline.load_config(config)["_class_name"]
    pipeline_class = getattr(diffusers, class_name, None)
    if not (isinstance(pipeline_class, type) and issubclass(pipeline_class, FromSingleFileMixin)):
        raise ValueError(f"{config} describes a {class_name}, which diffusers cannot load from a single file")
    try:
        pipe = pipeline_class.from_single_file(path, config=config, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, SingleFileComponentError) as err:
        reason = (str(err).strip().splitlines() or [""])[0][:300]  # diffusers' advice after it is about its own API
        if "meta tensor" in reason:  # diffusers' loader left the weights the file lacks unset
            reason = "the file lacks some of the weights"
        raise ValueError(
            f"cannot load {path} with the configs in {config} ({type(err).__name__}: {reason}); a single-file "
            "checkpoint must be a Stable Diffusion checkpoint in the original layout (as other UIs save it) of the "
            "architecture those configs describe: pass the config of the model it was trained from"
        ) from err
    _no_meta_tensors(pipe, path, config)
    return pipe


def pipeline_class(source: str) -> type[DiffusionPipeline]:
    """The class that loads directory ``source``: the genreg pipeline its model_index.json names (diffusers cannot
    find those by name, e.g. Score Forgetting's ``OneStepPipeline``), else ``DiffusionPipeline``, which picks the
    diffusers class itself (and reports a damaged index)."""
    try:
        name = json.loads((Path(source) / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return DiffusionPipeline
    if not isinstance(name, str) or hasattr(diffusers, name):
        return DiffusionPipeline
    import genreg.pipelines

    cls = getattr(genreg.pipelines, name, None) if name in genreg.pipelines.__all__ else None
    return cls if isinstance(cls, type) and issubclass(cls, DiffusionPipeline) else DiffusionPipeline


def require_multi_step(pipe: DiffusionPipeline, name: str, who: str) -> None:
    """Refuses a one-step generator (Score Forgetting Distillation's ``OneStepPipeline``) where ``who`` ("the app",
    "`genreg edit`") samples, edits or trains with many steps: it would be run as the model it was distilled from."""
    import genreg.pipelines

    if isinstance(pipe, genreg.pipelines.OneStepPipeline):
        raise ValueError(
            f"{name} is a one-step generator ({type(pipe).__name__}, as Score Forgetting Distillation writes); "
            f"{who} needs a multi-step model: use the model it was distilled from, and draw with this one by "
            f'`genreg generate --model {name} "a prompt"`'
        )


def load_pipeline(
    name_or_path: str | os.PathLike = "tinyworld",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: str | os.PathLike | None = None,
    **kwargs,
) -> DiffusionPipeline:
    """Loads a diffusers pipeline by name: ``"tinyworld"`` (bundled), a local directory, a hub id from the cache, or
    a single-file ``.safetensors`` checkpoint with ``config``. A directory whose model_index.json names one of
    genreg's pipelines (``genreg.pipelines``, e.g. the ``OneStepPipeline`` that Score Forgetting Distillation writes)
    loads as that class.

    Nothing is downloaded: a hub id must already be in the local Hugging Face cache, and a single file takes its
    component configs, tokenizer and scheduler from ``config``, a local diffusers directory of the same architecture
    or ``"tinyworld"``. ``device`` defaults to CUDA when available, else the CPU; ``dtype`` to fp16 on accelerators
    and fp32 on the CPU. Extra keyword arguments go to diffusers' ``from_pretrained`` / ``from_single_file``.
    """
    device = check_device(device) if device is not None else default_device()
    source = resolve_model(name_or_path)
    dtype = dtype if dtype is not None else default_dtype(device)
    if Path(source).is_file():
        if config is None:
            raise ValueError(f"{source} is a single-file checkpoint, which needs a config: {NEEDS_CONFIG}")
        return load_single_file(source, resolve_config(config), dtype, **kwargs).to(device)
    if config is not None:
        raise ValueError(f"config is only for single-file checkpoints; {source} brings its own configs")
    try:
        pipe = pipeline_class(source).from_pretrained(source, dtype=dtype, local_files_only=True, **kwargs)
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

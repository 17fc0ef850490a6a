"""SaRA's sparse update (Hu et al., ICLR 2025): M = |P0| < theta (Eq. 2), and P = P0 with P[M] = v, v a 1-D leaf
per tensor (unstructured backpropagation, Eqs. 6-7); the delta P - P0 is kept, scaled by alpha and merged (App. F-G).

Each selected tensor gets a ``torch.nn.utils.parametrize`` parametrization whose forward writes ``v`` into the
frozen tensor's own storage (no dense copy) and whose backward gathers the dense gradient at the selected entries:
autograd makes that gradient for one layer at a time and frees it, so only ``v``'s gradient is kept. The values are
ordinary ``nn.Parameter``s, so accelerate (DDP, mixed precision, gradient clipping, checkpoints) handles them as it
handles any parameter. A delta file stores, per tensor, the selected flat indices, ``v`` and ``P0`` itself at those
indices: it is applied only where the base matches, whatever its dtype, and ``unmerge`` restores P0 exactly.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from ...config import option
from ...io import atomic_write

DELTA_FILE = "sara_delta.safetensors"
FORMAT = "genreg-sara-1"


@dataclass
class SaRAConfig:
    """Which weights SaRA trains and how (paper defaults; lambda_rank from its hyperparameter study, App. K)."""

    threshold: float = option(2e-3, "train every targeted weight with |w| below this (theta_t)")
    targets: tuple[str, ...] = option(("*",), "parameter-name patterns to select from (fnmatch; default: all)")
    exclude: tuple[str, ...] | None = option(None, "parameter-name patterns never selected", place="advanced")
    lambda_rank: float = option(5e-3, "weight of the nuclear-norm low-rank loss (0 = off)", place="advanced")
    progressive_fraction: float = option(
        0.5, "re-select the still-small weights at this fraction of the steps (0 = never)", place="advanced"
    )
    rank_min_dim: int = option(
        64, "the low-rank loss picks 2-D weights whose sides both exceed this", place="advanced"
    )

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(
                f"threshold must be a positive number (the paper uses 2e-4 to 2e-3), got {self.threshold!r}"
            )
        if not (math.isfinite(self.lambda_rank) and self.lambda_rank >= 0):
            raise ValueError(f"lambda_rank must be a number >= 0, got {self.lambda_rank!r}")
        if not 0 <= self.progressive_fraction < 1:
            raise ValueError(f"progressive_fraction must be in [0, 1), got {self.progressive_fraction!r}")
        if isinstance(self.targets, str) or isinstance(self.exclude, str):
            raise ValueError("targets and exclude are lists of patterns, e.g. ['*attn*']")

    def wanted(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.targets) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude or ()
        )


def auto_learning_rate(threshold: float) -> float:
    """The paper's learning rate for a threshold (Eq. 12): 1e-3 exp(-350 theta)."""
    return 1e-3 * math.exp(-350 * threshold)


def select(model: nn.Module, config: SaRAConfig) -> dict[str, torch.Tensor]:
    """M of every targeted tensor as flat int64 indices where |P0| < threshold (compared in fp32)."""
    named = [(name, p) for name, p in model.named_parameters() if config.wanted(name)]
    if not named:
        raise ValueError(f"no parameter name matches targets {config.targets} (minus exclude {config.exclude})")
    selection = {}
    for name, p in named:
        index = (p.detach().float().abs() < config.threshold).flatten().nonzero().squeeze(1)
        if len(index):
            selection[name] = index
    if not selection:
        raise ValueError(
            f"no weight of the {len(named)} targeted tensors is below threshold {config.threshold}: raise it "
            "(2e-3 selects about 6% of SD 1.5's UNet)"
        )
    return selection


def scaled(values: torch.Tensor, base: torch.Tensor, alpha: float) -> torch.Tensor:
    """P0 + alpha (v - P0) at the selected entries (``v`` itself, exactly, for alpha = 1)."""
    return values if alpha == 1 else base.to(values.dtype) + alpha * (values - base.to(values.dtype))


class _Write(torch.autograd.Function):
    """Forward: the frozen tensor with ``values`` written at ``index`` in place; backward: the gradient there."""

    @staticmethod
    def forward(ctx, values, weight, index, base, scale):
        weight.view(-1)[index] = scaled(values, base, scale).to(weight.dtype)
        ctx.save_for_backward(index)
        ctx.scale = scale
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.reshape(-1)[index].float() * ctx.scale, None, None, None, None


class SparseValues(nn.Module):
    """The parametrization of one selected tensor: trainable ``values`` at ``index``, ``base`` = P0 there."""

    def __init__(self, weight: torch.Tensor, index: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        self.shape = weight.shape
        self.register_buffer("index", index.to(weight.device, torch.int64))
        self.register_buffer("base", weight.detach().reshape(-1)[self.index].clone())
        start = self.base.float() if values is None else values.float().to(weight.device)
        self.values = nn.Parameter(start.clone())
        self.scale = 1.0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _Write.apply(self.values, weight, self.index, self.base, self.scale)


def sparse_layers(model: nn.Module) -> dict[str, SparseValues]:
    """SaRA's parametrization of each selected tensor of ``model``, by the tensor's own name."""
    out = {}
    for path, module in model.named_modules():
        for leaf, plist in getattr(module, "parametrizations", {}).items():
            for p in plist:
                if isinstance(p, SparseValues):
                    out[f"{path}.{leaf}" if path else leaf] = p
    return out


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


@dataclass
class SaRADelta:
    """P - P0 of every selected tensor: flat ``index``, the trained ``values`` (fp32) and the base's ``base`` there."""

    index: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    settings: dict = field(default_factory=dict)

    def delta(self, name: str) -> torch.Tensor:
        return self.values[name] - self.base[name].float()

    @property
    def num_entries(self) -> int:
        return sum(len(i) for i in self.index.values())

    def save(self, path: str | Path) -> Path:
        """One safetensors file (``{name}.index/.values/.base``, settings in its metadata), written atomically."""
        tensors = {}
        for name in self.index:
            index = self.index[name]
            small = index.numel() == 0 or int(index.max()) < 2**31
            tensors[f"{name}.index"] = (index.to(torch.int32) if small else index).contiguous().cpu()
            tensors[f"{name}.values"] = self.values[name].float().contiguous().cpu()
            tensors[f"{name}.base"] = self.base[name].contiguous().cpu()
        metadata = {"format": FORMAT, "settings": json.dumps(self.settings)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> SaRADelta:
        path = Path(path)
        if path.is_dir():
            path = path / DELTA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"SaRA delta {path} does not exist")
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path} is not a SaRA delta written by genreg (format {metadata.get('format')!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
        delta = cls({}, {}, {}, json.loads(metadata.get("settings", "{}")))
        for name in names:
            delta.index[name] = tensors[f"{name}.index"].long()
            delta.values[name] = tensors[f"{name}.values"]
            delta.base[name] = tensors[f"{name}.base"]
            if not torch.isfinite(delta.values[name]).all():
                raise ValueError(f"{path} holds NaN or infinite values for {name}: the file is damaged")
        return delta

    @classmethod
    def combine(cls, weighted: Iterable[tuple[SaRADelta | str | Path, float]]) -> SaRADelta:
        """sum_k w_k Delta_k (App. G), over the union of the entries; the deltas must share their base."""
        out = cls({}, {}, {}, {"combined": []})
        for item, weight in weighted:
            d = item if isinstance(item, SaRADelta) else cls.load(item)
            out.settings["combined"].append({"weight": weight, **d.settings})
            for name, index in d.index.items():
                parts = [(index, weight * d.delta(name), d.base[name])]
                if name in out.index:
                    parts.insert(0, (out.index[name], out.delta(name), out.base[name]))
                indices, deltas, bases = (torch.cat(column) for column in zip(*parts, strict=True))
                union, inverse = torch.unique(indices, return_inverse=True)
                base = torch.empty(len(union), dtype=bases.dtype)
                base[inverse] = bases
                if not torch.equal(base[inverse], bases):
                    raise ValueError(f"the deltas were trained on different base models ({name} differs)")
                delta = torch.zeros(len(union)).index_add_(0, inverse, deltas.float())
                out.index[name], out.base[name], out.values[name] = union, base, base.float() + delta
        return out


def _check_base(model: nn.Module, delta: SaRADelta) -> dict[str, torch.Tensor]:
    """The model's tensors the delta names, refused unless P0 at the delta's entries is the one it recorded."""
    params = dict(model.named_parameters())
    missing = [name for name in delta.index if name not in params]
    if missing:
        raise ValueError(f"this SaRA delta was trained on another architecture: the model has no {missing[0]}")
    for name, index in delta.index.items():
        weight = params[name].detach().reshape(-1)
        if len(index) and int(index.max()) >= len(weight):
            raise ValueError(f"this SaRA delta was trained on another architecture: {name} is smaller here")
        here, recorded = weight[index.to(weight.device)], delta.base[name].to(weight.device, weight.dtype)
        differ = int((here != recorded).sum())
        if differ:
            raise ValueError(
                f"this SaRA delta was trained on another base model: {differ} of {len(index)} selected weights of "
                f"{name} differ from the base it recorded ({delta.base[name].dtype}); load it onto that model"
            )
    return params


@torch.no_grad()
def merge(model: nn.Module, delta: SaRADelta | str | Path, alpha: float = 1.0) -> nn.Module:
    """P = P0 + alpha Delta, in place, on a plain model (e.g. ``pipe.unet``); alpha in [0, 2] as App. F scales it."""
    delta = delta if isinstance(delta, SaRADelta) else SaRADelta.load(delta)
    if not 0 <= alpha <= 2:
        raise ValueError(f"alpha must be in [0, 2] (the paper's range), got {alpha}")
    params = _check_base(model, delta)
    for name, index in delta.index.items():
        weight = params[name]
        new = scaled(delta.values[name], delta.base[name], alpha)
        weight.view(-1)[index.to(weight.device)] = new.to(weight.device, weight.dtype)
    return model


@torch.no_grad()
def unmerge(model: nn.Module, delta: SaRADelta | str | Path) -> nn.Module:
    """Puts P0 back, exactly, where ``merge`` wrote ``delta``."""
    delta = delta if isinstance(delta, SaRADelta) else SaRADelta.load(delta)
    params = dict(model.named_parameters())
    for name, index in delta.index.items():
        weight = params[name]
        weight.view(-1)[index.to(weight.device)] = delta.base[name].to(weight.device, weight.dtype)
    return model


@contextmanager
def merged(model: nn.Module, delta: SaRADelta | str | Path, alpha: float = 1.0) -> Iterator[nn.Module]:
    """``model`` with ``delta`` merged for the block, and exactly as it was after it."""
    delta = delta if isinstance(delta, SaRADelta) else SaRADelta.load(delta)
    merge(model, delta, alpha)
    try:
        yield model
    finally:
        unmerge(model, delta)


def load_into(pipe, delta: SaRADelta | str | Path, alpha: float = 1.0):
    """Merges a saved SaRA delta into a plain diffusers pipeline's UNet; returns the pipeline."""
    merge(pipe.unet, delta, alpha)
    return pipe


class SaRAModel(nn.Module):
    """``model`` with SaRA's trainable values on every selected tensor (build with ``prepare``); its other weights
    are frozen. Call it as the model; ``delta()`` / ``save_pretrained`` keep the update, ``merge_and_unload`` and
    ``unload`` give the plain model back with or without it."""

    def __init__(self, model: nn.Module, selection: dict[str, torch.Tensor], config: SaRAConfig):
        super().__init__()
        self.model, self.config = model, config
        self._flags = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        for name, index in selection.items():
            module, leaf = _owner(model, name)
            parametrize.register_parametrization(module, leaf, SparseValues(getattr(module, leaf), index))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def layers(self) -> dict[str, SparseValues]:
        return sparse_layers(self.model)

    def num_trainable(self) -> int:
        return sum(layer.values.numel() for layer in self.layers().values())

    def set_scale(self, alpha: float) -> None:
        """Samples with P0 + alpha Delta from the next forward on (alpha in [0, 2]; training uses 1)."""
        if not 0 <= alpha <= 2:
            raise ValueError(f"alpha must be in [0, 2] (the paper's range), got {alpha}")
        for layer in self.layers().values():
            layer.scale = alpha

    def delta(self) -> SaRADelta:
        out = SaRADelta({}, {}, {}, {"config": asdict(self.config)})
        for name, layer in self.layers().items():
            out.index[name] = layer.index.detach().cpu()
            out.values[name] = layer.values.detach().float().cpu()
            out.base[name] = layer.base.detach().cpu()
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        return self.delta().save(Path(directory) / DELTA_FILE)

    def _remove(self) -> nn.Module:
        for name in self.layers():
            module, leaf = _owner(self.model, name)
            parametrize.remove_parametrizations(module, leaf, leave_parametrized=True)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._flags.get(name, False))
        return self.model

    @torch.no_grad()
    def merge_and_unload(self, alpha: float = 1.0) -> nn.Module:
        """The plain model with P0 + alpha Delta (save it with ``save_pretrained`` as any diffusers model)."""
        self.set_scale(alpha)
        return self._remove()

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """The plain model as it was before ``prepare`` (P0, exactly)."""
        self.set_scale(0.0)
        return self._remove()


def prepare(model: nn.Module, config: SaRAConfig | None = None) -> SaRAModel:
    """``model`` ready for SaRA training: the weights below ``config.threshold`` trainable, the rest frozen."""
    config = config or SaRAConfig()
    return SaRAModel(model, select(model, config), config)

"""The shared attention layer: efficient processors, recording on selected layers, and a memory-efficient map energy.

- ``use_efficient_attention(model)``: PyTorch SDPA on every plain attention layer, or xformers when it is installed and
  the model is on CUDA (otherwise one log line says why SDPA is used).
- ``select_layers(model, kind=..., blocks=..., levels=...)`` names attention layers by block, resolution level and
  self/cross; ``recording(model, layers, recorder)`` puts a ``RecordingProcessor`` on those layers only, for the
  length of a ``with`` block, and then restores the exact previous processor objects, whatever happens. Every other
  layer keeps its own processor (SDPA by default in diffusers). A recording layer still computes its output with
  SDPA, exactly as ``AttnProcessor2_0`` does, so recording never changes a model's output.
- An ``AttentionRecorder`` keeps, while capturing, what a method asks for: attention probabilities (with or without
  gradient) or the queries and keys (all a self-attention energy needs: heads x L x d instead of heads x L x L).
- ``genreg.injection`` builds on it: some batch rows' cross-attention maps taken from other rows (Prompt-to-Prompt).
- ``attention_map_energy`` computes sum((A_ref - A_cur)^2) of two attention maps from their queries and keys, in query
  chunks recomputed in backward, so peak memory grows with chunk x L instead of heads x L^2.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor as ap
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

BLOCK_ALIASES = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}
KINDS = ("self", "cross", "all")
BACKENDS = ("auto", "sdpa", "xformers")

# Processors that compute plain softmax attention from to_q/to_k/to_v, which a RecordingProcessor may stand in for.
_PLAIN_NAMES = (
    "AttnProcessor",
    "AttnProcessor2_0",
    "XFormersAttnProcessor",
    "SlicedAttnProcessor",
    "FusedAttnProcessor2_0",
    "AttnProcessorNPU",
)
PLAIN_PROCESSORS = tuple(getattr(ap, name) for name in _PLAIN_NAMES if hasattr(ap, name))

_logged: set[str] = set()


def _log_once(message: str, level: int = logging.INFO) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


# ---------------------------------------------------------------------------------------------------------------------
# Efficient processors


def efficient_processor(device: torch.device | str, backend: str = "auto"):
    """The attention processor to use on ``device``: xformers for ``"xformers"`` (and for ``"auto"`` on CUDA) when it
    is installed and the device is CUDA, else PyTorch SDPA (``AttnProcessor2_0``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "xformers" or (backend == "auto" and device.type == "cuda"):
        installed = importlib.util.find_spec("xformers") is not None
        if installed and device.type == "cuda":
            return ap.XFormersAttnProcessor()
        reason = "xformers is not installed" if not installed else f"xformers needs CUDA and the model is on {device}"
        _log_once(
            f"{reason}; using PyTorch SDPA attention", logging.WARNING if backend == "xformers" else logging.INFO
        )
    return ap.AttnProcessor2_0()


def use_efficient_attention(model: torch.nn.Module, backend: str = "auto") -> str:
    """Puts the efficient processor on every plain attention layer of ``model`` (custom processors, e.g. IP-Adapter's,
    are left alone); returns the processor's class name."""
    device = next(model.parameters()).device
    processor = efficient_processor(device, backend)
    for layer in attention_layers(model):
        if isinstance(layer.module.processor, PLAIN_PROCESSORS):
            layer.module.set_processor(processor)
    return type(processor).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Naming and selecting layers


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a model.

    ``name`` is its processor's key in ``model.attn_processors``; ``block`` the UNet block it sits in
    ("down_blocks.1", "mid_block", "up_blocks.0"); ``level`` its resolution: 0 at the latent's own resolution, 1 at
    half of it, and so on (None outside a UNet's blocks); ``cross`` whether it attends to text.
    """

    name: str
    block: str | None
    level: int | None
    cross: bool
    module: torch.nn.Module = field(compare=False, repr=False)


def _level(block_name: str | None, model) -> int | None:
    if block_name is None:
        return None
    n = len(getattr(model, "down_blocks", ()))
    kind, _, index = block_name.partition(".")
    if kind == "down_blocks":
        return int(index)
    if kind == "mid_block":
        return n - 1
    if kind == "up_blocks":  # an up block attends before its upsampler
        return len(model.up_blocks) - 1 - int(index)
    return None


def attention_layers(model: torch.nn.Module) -> list[AttentionLayer]:
    """Every diffusers ``Attention`` module of ``model``, in module order."""
    layers = []
    for module_name, module in model.named_modules():
        if not isinstance(module, ap.Attention):
            continue
        parts = module_name.split(".")
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
            block = ".".join(parts[:2])
        else:
            block = "mid_block" if parts[0] == "mid_block" else None
        layers.append(
            AttentionLayer(
                f"{module_name}.processor", block, _level(block, model), bool(module.is_cross_attention), module
            )
        )
    return layers


def select_layers(
    model: torch.nn.Module,
    kind: str = "self",
    blocks: Iterable[str] | None = None,
    levels: Iterable[int] | None = None,
) -> list[AttentionLayer]:
    """Attention layers of ``model`` by kind ("self", "cross" or "all"), block and resolution level.

    ``blocks`` are name prefixes: "down", "mid", "up" or e.g. "up_blocks.1", "up_blocks.1.attentions.0" (None: all).
    ``levels``: 0 is the latent's resolution (64x64 in SD 1.5 at 512 px), 1 half of it, ... (None: all).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; choose one of {', '.join(KINDS)}")
    layers = attention_layers(model)
    prefixes = None if blocks is None else [BLOCK_ALIASES.get(b, b) + "." for b in blocks]
    levels = None if levels is None else set(levels)
    chosen = [
        layer
        for layer in layers
        if (kind == "all" or layer.cross == (kind == "cross"))
        and (prefixes is None or any(layer.name.startswith(p) for p in prefixes))
        and (levels is None or layer.level in levels)
    ]
    if layers and not chosen:
        available = sorted({(layer.block, layer.level) for layer in layers if layer.block}, key=str)
        raise ValueError(
            f"no {kind}-attention layer matches blocks={blocks} levels={sorted(levels) if levels else levels}; "
            f"this model has attention in (block, level): {available}"
        )
    return chosen


# ---------------------------------------------------------------------------------------------------------------------
# Recording


@dataclass
class AttentionRecord:
    """What one call of a recording layer kept: queries and keys (rows, heads, L, d) and/or the probabilities
    (rows, heads, L_q, L_k) in fp32, with the softmax scale used."""

    scale: float
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    probs: torch.Tensor | None = None


class AttentionRecorder:
    """Keeps, per layer name, what the recording layers saw while ``capture`` is on.

    Args:
        keep: ``"probs"`` (attention probabilities), ``"qk"`` (queries and keys), or both (``("probs", "qk")``).
        grad: keep the autograd graph of what is recorded (only meaningful when the pass itself runs with gradient).
    """

    def __init__(self, keep: str | Iterable[str] = "probs", grad: bool = False):
        self.keep = {keep} if isinstance(keep, str) else set(keep)
        if not self.keep or not self.keep <= {"probs", "qk"}:
            raise ValueError(f"keep must be 'probs', 'qk' or both, got {keep!r}")
        self.grad = grad
        self.active = False
        self.rows: slice | None = None
        self.records: dict[str, list[AttentionRecord]] = {}

    @contextmanager
    def capture(self, rows: slice | None = None) -> Iterator[AttentionRecorder]:
        """Records while inside; ``rows`` picks the batch rows to keep (None: all). Outside, nothing is recorded,
        which also keeps a checkpointed backward's recomputation from recording twice."""
        before = self.active, self.rows
        self.active, self.rows = True, rows
        try:
            yield self
        finally:
            self.active, self.rows = before

    def take(self) -> dict[str, list[AttentionRecord]]:
        """Returns the records and forgets them."""
        records, self.records = self.records, {}
        return records

    def add(self, name: str, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float) -> None:
        if not self.active:
            return
        if self.rows is not None:
            query, key = query[self.rows], key[self.rows]
            mask = mask[self.rows] if mask is not None and len(mask) > 1 else mask
        if not self.grad:
            query, key = query.detach(), key.detach()
        record = AttentionRecord(scale)
        if "qk" in self.keep:
            record.query, record.key = query, key
        if "probs" in self.keep:
            scores = query.float() @ key.float().transpose(-1, -2) * scale
            record.probs = (scores if mask is None else scores + mask.float()).softmax(dim=-1)
        self.records.setdefault(name, []).append(record)


@dataclass
class Projected:
    """An attention call's queries, keys and values (B, heads, L, d), its prepared mask and softmax scale, and what
    ``finish`` needs to turn the attended values into the layer's output as ``AttnProcessor2_0`` does."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scale: float
    sdpa_scale: dict
    finish: object


def project_qkv(attn: ap.Attention, hidden_states, encoder_hidden_states, attention_mask, temb) -> Projected:
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch_size, sequence_length, _ = context.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    def finish(attended: torch.Tensor) -> torch.Tensor:
        out = attended.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    # SDPA's default scale is what AttnProcessor2_0 uses; pass attn.scale only where a model sets another one.
    default = head_dim**-0.5
    sdpa_scale = {} if abs(attn.scale - default) < 1e-12 else {"scale": attn.scale}
    return Projected(query, key, value, attention_mask, sdpa_scale.get("scale", default), sdpa_scale, finish)


def attend_sdpa(p: Projected) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        p.query, p.key, p.value, attn_mask=p.mask, dropout_p=0.0, is_causal=False, **p.sdpa_scale
    )


class RecordingProcessor:
    """Scaled-dot-product attention (as ``AttnProcessor2_0``) that hands its queries and keys to a recorder."""

    def __init__(self, recorder: AttentionRecorder, name: str):
        self.recorder, self.name = recorder, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        p = project_qkv(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.recorder.add(self.name, p.query, p.key, p.mask, p.scale)
        return p.finish(attend_sdpa(p))


_STANDS_IN_FOR = PLAIN_PROCESSORS + (RecordingProcessor,)


@contextmanager
def installed_processors(model: torch.nn.Module, layers: Iterable[AttentionLayer], make, what: str) -> Iterator[None]:
    """Puts ``make(layer)`` on ``layers`` (only those) and restores the exact previous processor objects on exit,
    whatever happens. A layer with a custom processor (e.g. IP-Adapter) is refused rather than replaced."""
    previous: list[tuple[torch.nn.Module, object]] = []
    try:
        for layer in layers:
            processor = layer.module.processor
            if not isinstance(processor, _STANDS_IN_FOR):
                raise ValueError(
                    f"attention layer {layer.name} uses {type(processor).__name__}, which cannot be {what}: "
                    "leave it out of the selection, or use plain attention there"
                )
            previous.append((layer.module, processor))
            layer.module.set_processor(make(layer))
        yield
    finally:
        for module, processor in reversed(previous):
            module.set_processor(processor)


@contextmanager
def recording(
    model: torch.nn.Module, layers: Iterable[AttentionLayer], recorder: AttentionRecorder
) -> Iterator[AttentionRecorder]:
    """Installs a ``RecordingProcessor`` on ``layers`` (only those) for the ``with`` block."""
    with installed_processors(model, layers, lambda layer: RecordingProcessor(recorder, layer.name), "recorded from"):
        yield recorder


# ---------------------------------------------------------------------------------------------------------------------
# The memory-efficient attention-map energy


def _chunk_energy(q_ref, k_ref, q_cur, k_cur, scale: float) -> torch.Tensor:
    a_ref = torch.softmax(q_ref @ k_ref.transpose(-1, -2) * scale, dim=-1)
    a_cur = torch.softmax(q_cur @ k_cur.transpose(-1, -2) * scale, dim=-1)
    return (a_ref - a_cur).square().sum()


def attention_map_energy(
    q_ref: torch.Tensor,
    k_ref: torch.Tensor,
    q_cur: torch.Tensor,
    k_cur: torch.Tensor,
    scale: float,
    chunk_size: int = 256,
) -> torch.Tensor:
    """sum over heads, i, j of (softmax(s q_ref k_ref^T) - softmax(s q_cur k_cur^T))^2, in fp32.

    Inputs are (..., L, d) queries and keys (e.g. rows x heads x L x d). The maps are never built whole: query rows are
    taken ``chunk_size`` at a time (all heads together) and each chunk is recomputed in backward, so peak memory is a
    few heads x chunk_size x L floats, not heads x L x L.
    """
    if q_ref.shape != q_cur.shape or k_ref.shape != k_cur.shape:
        raise ValueError(
            f"reference and current attention differ in shape: q {tuple(q_ref.shape)} vs {tuple(q_cur.shape)}, "
            f"k {tuple(k_ref.shape)} vs {tuple(k_cur.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    q_ref, k_ref, q_cur, k_cur = (t.float().flatten(0, -3) for t in (q_ref, k_ref, q_cur, k_cur))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_ref, k_ref, q_cur, k_cur))
    total = q_cur.new_zeros(())
    for start in range(0, q_cur.shape[1], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (q_ref[:, rows], k_ref, q_cur[:, rows], k_cur, scale)
        total = total + (checkpoint(_chunk_energy, *args, use_reentrant=False) if needs_grad else _chunk_energy(*args))
    return total

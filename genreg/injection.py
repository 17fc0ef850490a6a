"""Prompt-to-Prompt's cross-attention replacement (Hertz et al., 2023) on the shared attention layer: some batch rows
of a UNet call take their cross-attention maps from other rows, token by token (HiFi Tuner's subject replacement)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .attention import attend_sdpa, installed_processors, project_qkv, select_layers


@dataclass
class CrossAttentionInjection:
    """Prompt-to-Prompt's attention replacement (Hertz et al., 2023) between batch rows of one UNet call: in each
    ``target`` row a cross-attention map takes column ``columns[j]`` of its ``source`` row's map, except the columns
    where ``fresh[j]`` (the tokens whose own attention is wanted); with ``normalize`` each query's mixed weights are
    scaled to sum to one again (source and fresh columns come from two softmaxes). Off while ``active`` is False."""

    source: list[int]
    target: list[int]
    columns: torch.Tensor  # (L_k,) long: the source token each target token reads its map from
    fresh: torch.Tensor  # (L_k,) bool: target tokens that keep their own map
    normalize: bool = True
    active: bool = True

    def __post_init__(self):
        if len(self.source) != len(self.target):
            raise ValueError(f"{len(self.source)} source rows for {len(self.target)} target rows: pair them")
        if self.columns.shape != self.fresh.shape:
            raise ValueError(f"columns {tuple(self.columns.shape)} and fresh {tuple(self.fresh.shape)} differ")


class InjectionProcessor:
    """Cross-attention whose maps in the injection's target rows come from its source rows; exact SDPA otherwise.
    The maps are built explicitly (queries x text tokens, small next to self-attention's queries x queries)."""

    def __init__(self, injection: CrossAttentionInjection):
        self.injection = injection

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        p = project_qkv(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        inj = self.injection
        if not inj.active or encoder_hidden_states is None:
            return p.finish(attend_sdpa(p))
        if p.key.shape[-2] != len(inj.columns):
            raise ValueError(f"the injection maps {len(inj.columns)} tokens, the text has {p.key.shape[-2]}")
        scores = p.query.float() @ p.key.float().transpose(-1, -2) * p.scale
        probs = (scores if p.mask is None else scores + p.mask.float()).softmax(dim=-1)
        source = probs[inj.source][..., inj.columns.to(probs.device)]
        mixed = torch.where(inj.fresh.to(probs.device), probs[inj.target], source)
        probs[inj.target] = mixed / mixed.sum(-1, keepdim=True) if inj.normalize else mixed
        return p.finish(probs.to(p.value.dtype) @ p.value)


@contextmanager
def injecting(model: torch.nn.Module, injection: CrossAttentionInjection) -> Iterator[CrossAttentionInjection]:
    """Installs an ``InjectionProcessor`` on every cross-attention layer of ``model`` for the ``with`` block."""
    layers = select_layers(model, "cross")
    with installed_processors(model, layers, lambda layer: InjectionProcessor(injection), "injected"):
        yield injection

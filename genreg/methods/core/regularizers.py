"""CoRe's math (Wu et al., AAAI 2025): which tokens are context, the two context regularizers and the norm rescaling.

    L_emb  = 1/(n-1) sum_{i != k} [1 - cos(E(y*)_i, E(y_cat)_i)]               (Eq. 3)
    L_attn = 1/(n-1) sum_{i != k} (mu(M_i^{1:L}) - mu(M'_i^{1:L}))^2           (Eq. 4)
    v*     = argmin_v L_diffusion + lambda_emb L_emb + lambda_attn L_attn       (Eq. 5)
    v_s   <- v_s / ||v_s|| * ||v_{s-1}||   inside the rescaling window          (Eq. 6)

k is the subject's place (S* in y*, the category word in y_cat); context tokens are the start token, the words before
and after the subject and the end token, never padding. Where the official code differs genreg follows the paper:
the cosine is per token over features (the code's ``dim=1`` takes it per feature over tokens), mu averages the maps of
every cross-attention layer before the square (the code squares per layer), and the batch is averaged (the code sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def context_positions(ids: list[int], start: int, width: int, eos_id: int) -> list[int]:
    """{i != k}: the start token and words before the subject ``ids[start:start+width]``, then those after it up to
    and including the first end token (padding, even when it is the end token, excluded)."""
    try:
        end = ids.index(eos_id, start + width)
    except ValueError:
        raise ValueError("the prompt has no end token after the subject: it is too long for the tokenizer") from None
    return [*range(start), *range(start + width, end + 1)]


def _aligned(a: torch.Tensor, b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor):
    """Row by row, the context entries of ``a`` and ``b`` in order (both masks select n - 1 tokens per row)."""
    return [(x[m], y[n]) for x, y, m, n in zip(a, b, mask_a, mask_b, strict=True)]


def context_embedding_loss(
    hidden: torch.Tensor, category_hidden: torch.Tensor, mask: torch.Tensor, category_mask: torch.Tensor
) -> torch.Tensor:
    """L_emb = 1/(n-1) sum_{i != k} [1 - cos(E(y*)_i, E(y_cat)_i)] (Eq. 3), batch mean; (B, L, d), masks (B, L)."""
    rows = _aligned(hidden.float(), category_hidden.float(), mask, category_mask)
    return torch.stack([(1 - F.cosine_similarity(h, c, dim=-1)).mean() for h, c in rows]).mean()


def token_attention(records: dict) -> torch.Tensor:
    """mu(M_i^{1:L}): token i's attention, mean over heads and pixels, then over layers; (B, L_text) of one pass."""
    maps = [record.probs.mean(dim=(1, 2)) for layer in records.values() for record in layer]
    if not maps:
        raise ValueError("no cross-attention was recorded: the model has no cross-attention layer to regularize")
    return torch.stack(maps).mean(0)


def context_attention_loss(
    attention: torch.Tensor, category_attention: torch.Tensor, mask: torch.Tensor, category_mask: torch.Tensor
) -> torch.Tensor:
    """L_attn = 1/(n-1) sum_{i != k} (mu(M_i) - mu(M'_i))^2 (Eq. 4), batch mean; (B, L_text), masks (B, L_text)."""
    rows = _aligned(attention, category_attention, mask, category_mask)
    return torch.stack([(a - c).square().mean() for a, c in rows]).mean()


def rescale_to(vectors: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """v_s <- v_s / ||v_s|| * ||v_{s-1}|| (Eq. 6), per vector (``norms``: (N, 1), the norms before the step)."""
    return vectors * (norms / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12))

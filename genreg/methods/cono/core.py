"""CoNo's math (Wang, Li, Chen, arXiv 2406.05082): the two noise shuffles, the look-back, the consistency step.

Every clip of a CoNo video starts from a permutation of one group of N initial noise frames; ``order`` lists which
noise frame sits at each position. The paper's code is unreleased: these follow ``research/inference-methods.md`` §3,
where it says what is known and what is left open (the regularizer's reduction, the step range), both exposed here.
"""

from __future__ import annotations

import torch


def extending_shuffle(order: list[int], guided: int) -> list[int]:
    """Extending noise shuffle (Fig. 2, top): reverse the whole group, then re-reverse its first ``guided`` (N1)
    positions, so the new clip starts with the previous clip's last N1 noises in their order, the rest reversed."""
    reverse = order[::-1]
    return reverse[:guided][::-1] + reverse[guided:]


def internal_shuffle(order: list[int], left: int, right: int) -> list[int]:
    """Internal noise shuffle: keep the first ``left`` (N1) positions, move positions N1+N2.. into the middle and
    N1..N1+N2-1 to the end, where stage 1's predicted noise guides them; the middle frames become the transition."""
    return order[:left] + order[left + right :] + order[left : left + right]


def consistency_gradient(eps: torch.Tensor, reference_mean: torch.Tensor, reduction: str) -> torch.Tensor:
    """grad of g = ||m_ref - (1/N) sum_i eps_i||^2 (Eq. of §3.2c) w.r.t. each frame's predicted noise, in closed form:
    (2/N)(m - m_ref) per frame, over C*H*W again for ``reduction="mean"``. ``eps`` is (B, C, N, H, W); the mean is
    over frames (dim 2)."""
    frames = eps.shape[2]
    grad = 2.0 / frames * (eps.mean(dim=2, keepdim=True) - reference_mean)
    if reduction == "mean":
        channels, height, width = eps.shape[1], eps.shape[3], eps.shape[4]
        grad = grad / (channels * height * width)
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return grad.expand_as(eps)


def video_plan(
    num_prompts: int, num_frames: int, clip: int, guided: int, internal: bool
) -> tuple[list[int], list[int], list[int]]:
    """How a ``num_frames`` video is drawn: the prompt of each clip stage (the first clip, then one per extension), the
    prompt of each kept frame, and the frames where a newly drawn clip's kept frames begin.

    The first clip keeps all ``clip`` frames; an extension keeps its clips' frames after the ``guided`` ones: the
    internal stage's and extending stage 2's with ``internal`` (2 (N - N1) frames), else extending stage 1's (N - N1).
    The stages are shared among the prompts in order, each prompt at least one whole stage."""
    per_clip = clip - guided
    new = 2 * per_clip if internal else per_clip
    least = clip + (num_prompts - 1) * new
    if num_frames < least:
        raise ValueError(
            f"{num_prompts} prompts need at least {least} frames ({clip} for the first clip, {new} for each next"
            f" prompt); got num_frames={num_frames}"
        )
    stages = 1 + max(0, -(-(num_frames - clip) // new))
    prompts = [s * num_prompts // stages for s in range(stages)]
    owner = [prompts[0]] * clip + [k for k in prompts[1:] for _ in range(new)]
    starts = [clip + j * per_clip for j in range((stages - 1) * new // per_clip)]
    return prompts, owner[:num_frames], [b for b in starts if b < num_frames]

"""The chunked self-attention energy against the materialised-map computation: value, gradient, time, peak memory.

python scripts/bench_attention_energy.py                      # SD 1.5's 64x64 latent: 8 heads, HW 4096, head dim 40
python scripts/bench_attention_energy.py --hw 1024 --chunk 128

Each variant runs energy + backward in a fresh process. Peak memory is measured, not estimated: on CUDA with
``torch.cuda.max_memory_allocated``; on the CPU as the growth of the process's peak resident set (``ru_maxrss``) over
its level after the inputs exist, with glibc told to hand large freed blocks straight back (so the figure follows
the live tensors: every tensor the computation allocates, plus allocator slack).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

import numpy as np
import torch

from genreg.attention import attention_map_energy


def naive_energy(q_ref, k_ref, q_cur, k_cur, scale: float) -> torch.Tensor:
    """The materialised computation: both full (heads, HW, HW) maps at once."""
    a_ref = torch.softmax(q_ref @ k_ref.transpose(-1, -2) * scale, dim=-1)
    a_cur = torch.softmax(q_cur @ k_cur.transpose(-1, -2) * scale, dim=-1)
    return (a_ref - a_cur).square().sum()


def inputs(heads: int, hw: int, dim: int, device: str):
    g = torch.Generator().manual_seed(0)
    q_ref, k_ref = torch.randn(2, heads, hw, dim, generator=g)
    q_cur = (q_ref + 0.3 * torch.randn(heads, hw, dim, generator=g)).to(device).requires_grad_()
    k_cur = (k_ref + 0.3 * torch.randn(heads, hw, dim, generator=g)).to(device).requires_grad_()
    return q_ref.to(device), k_ref.to(device), q_cur, k_cur


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run(variant: str, heads: int, hw: int, dim: int, chunk: int, device: str, queue) -> None:
    q_ref, k_ref, q_cur, k_cur = inputs(heads, hw, dim, device)
    scale = dim**-0.5
    warm = inputs(1, 64, dim, device)  # first-call allocations (thread pools, BLAS buffers) stay out of the peak
    naive_energy(*warm, scale).backward()
    attention_map_energy(*warm, scale, chunk_size=16).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resident_bytes()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "naive":
        energy = naive_energy(q_ref, k_ref, q_cur, k_cur, scale)
    else:
        energy = attention_map_energy(q_ref, k_ref, q_cur, k_cur, scale, chunk_size=chunk)
    gq, gk = torch.autograd.grad(energy, (q_cur, k_cur))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak, exact = torch.cuda.max_memory_allocated() - base, True
    else:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        peak, exact = after * 1024 - base, after > before  # else the earlier high-water mark hides the peak
    queue.put((energy.item(), gq.cpu().numpy(), gk.cpu().numpy(), seconds, peak, exact))  # numpy: no shared memory


def measure(variant: str, args) -> tuple:
    # A fixed mmap threshold makes glibc return every large freed block to the system at once, so the resident set
    # follows the live tensors (its default, adaptive threshold keeps freed blocks and inflates the figure).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run, args=(variant, args.heads, args.hw, args.dim, args.chunk, args.device, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--hw", type=int, default=4096, help="tokens per map (64x64 latent = 4096)")
    parser.add_argument("--dim", type=int, default=40, help="head dimension")
    parser.add_argument("--chunk", type=int, default=256, help="query rows per chunk")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    e_naive, gq_naive, gk_naive, t_naive, m_naive, exact_naive = measure("naive", args)
    e_chunk, gq_chunk, gk_chunk, t_chunk, m_chunk, exact_chunk = measure("chunked", args)

    def rel(a, b):
        return abs(a - b) / abs(b) if isinstance(a, float) else float(np.linalg.norm(a - b) / np.linalg.norm(b))

    mib = 2**20
    map_mib = args.heads * args.hw * args.hw * 4 / mib
    print(f"{args.heads} heads, HW {args.hw}, head dim {args.dim}, chunk {args.chunk}, {args.device}")
    print(
        f"one full fp32 map: {map_mib:.0f} MiB; one chunk of both maps: {2 * map_mib * args.chunk / args.hw:.0f} MiB"
    )
    print(f"energy: naive {e_naive:.6g}, chunked {e_chunk:.6g}, relative difference {rel(e_chunk, e_naive):.2e}")
    print(f"gradient relative difference: q {rel(gq_chunk, gq_naive):.2e}, k {rel(gk_chunk, gk_naive):.2e}")
    print(
        f"peak memory of energy + backward: naive {m_naive / mib:.0f} MiB, chunked {m_chunk / mib:.0f} MiB, ratio "
        f"{m_naive / max(m_chunk, 1):.1f}x"
    )
    if not (exact_naive and exact_chunk):
        print("(a variant stayed under its process's earlier memory high-water mark: its figure is an upper bound)")
    print(f"time: naive {t_naive:.2f}s, chunked {t_chunk:.2f}s, ratio {t_chunk / t_naive:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

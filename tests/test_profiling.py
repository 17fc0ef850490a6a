"""The benchmarks' memory readings: the peak follows this process, and a reset starts it again."""

from __future__ import annotations

import numpy as np

from genreg.profiling import peak_rss_mib, reset_peak_rss, rss_mib


def test_the_peak_sees_a_freed_block_until_it_is_reset():
    reset_peak_rss()
    start = rss_mib()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert peak_rss_mib() >= start + 60
    del block
    reset_peak_rss()
    assert peak_rss_mib() < start + 30  # the freed block no longer counts


def test_tensor_peak_counts_what_is_live_at_once():
    import torch

    from genreg.profiling import tensor_peak

    kept = torch.ones(2**20)  # live before the block: not counted
    with tensor_peak() as memory:
        a = torch.ones(2**20)  # 4 MiB
        b = a * 2  # 8 MiB live
        del a
        c = b + 1  # 8 MiB live again (a was freed)
        del b, c
        d = torch.ones(2**19)  # 2 MiB
    assert abs(memory.peak_mib - 8) < 0.1
    assert abs(memory.allocated_mib - 14) < 0.1
    del kept, d

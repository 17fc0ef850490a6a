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

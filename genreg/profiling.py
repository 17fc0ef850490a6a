"""Memory of this process, as the benchmarks measure it (Linux /proc): current and peak resident memory, and a
reset of the peak so that one process can measure several runs in turn.

The peak is ``VmHWM``, not ``getrusage().ru_maxrss``: Linux carries ``ru_maxrss`` over from the parent through
fork and exec and never lowers it, so a child or a later run would report at least an earlier peak.
"""

from __future__ import annotations

import resource
from pathlib import Path


def rss_mib() -> float:
    """Resident memory now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """The most resident memory since the process started or since :func:`reset_peak_rss` (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line: peak memory is measured on Linux only")


def reset_peak_rss() -> None:
    """Sets the peak to the resident memory now (``/proc/self/clear_refs``, value 5)."""
    Path("/proc/self/clear_refs").write_text("5")

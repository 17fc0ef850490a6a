"""Memory of this process, as the benchmarks measure it: current and peak resident memory (Linux /proc), a reset
of the peak so that one process can measure several runs in turn, and the peak of live CPU tensors in a block.

The peak is ``VmHWM``, not ``getrusage().ru_maxrss``: Linux carries ``ru_maxrss`` over from the parent through
fork and exec and never lowers it, so a child or a later run would report at least an earlier peak.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


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


@dataclass
class TensorPeak:
    peak_mib: float = 0.0  # the most CPU tensor memory live at once in the block, above what was live at its start
    allocated_mib: float = 0.0  # all CPU tensor memory allocated in the block


@contextmanager
def tensor_peak() -> Iterator[TensorPeak]:
    """Measures the block's CPU tensor memory exactly, as ``torch.cuda.max_memory_allocated`` does on a GPU: the
    running sum of the profiler's allocation and free events (the allocator's cache, the interpreter and the heap's
    fragmentation, which resident memory also counts, are left out). The figures are set when the block ends."""
    result = TensorPeak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    events = prof.profiler.kineto_results.events()
    events = [e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = allocated = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
        allocated += max(event.nbytes(), 0)
    result.peak_mib, result.allocated_mib = peak / 2**20, allocated / 2**20

"""Reusing freed host memory when training on the CPU (glibc's malloc).

By default glibc gives large freed blocks back to the kernel: a block above its mmap threshold
at once, and the top of the heap once more than its trim threshold is free there. The next
tensor of that size then lives in fresh pages, and the kernel zeroes each one in a page fault.
A training step frees and reallocates its activations every step, and padding-free rows change
size from step to step, so glibc's adaptive threshold keeps being outrun: on the realistic
benchmark preset a 16-step run took 300,000-370,000 page faults and 0.6-0.8 s of kernel time
(of about 8 CPU-seconds). Raising both thresholds keeps freed blocks in the heap for the next
step: the same numbers, fewer faults (benchmarks/RESULTS.md). This is what PyTorch's own CPU
launcher gets by preloading tcmalloc or jemalloc.

The setting is process-wide and stays for the life of the process; the heap keeps up to
TRIM_THRESHOLD_BYTES of free memory instead of returning it.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1

_M_MMAP_THRESHOLD = -3

# Blocks below this come from the heap (glibc's default starts at 128 KiB and adapts).
MMAP_THRESHOLD_BYTES = 256 << 20

# Free memory the heap's top may keep before it is returned to the kernel.
TRIM_THRESHOLD_BYTES = 1 << 30


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, else None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def reuse_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds so freed tensors' memory is reused instead of
    returned to the kernel. Returns whether the settings took effect (False off glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))

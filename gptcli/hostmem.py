"""The process's host (CPU) memory policy: how glibc's malloc returns freed memory.

A process-wide setting, so it is the program's choice, made once at its entry point
(``train.host_memory`` in the config); numerics never change. Linux/glibc only.
"""

from __future__ import annotations

import ctypes
import sys


def set_host_memory(policy: str) -> bool:
    """Set glibc malloc's policy for this process: "retain" or "return" freed memory.

    A training step allocates and frees the same buffers every step: a few huge ones
    (logits, their softmax and gradients: 400 MB each for the 124M model at batch 8) and
    hundreds of activations of 1-30 MB. By default glibc serves huge ones from a fresh
    mmap and unmaps them when freed, and after such a free raises its mmap threshold so
    that the activations come from the heap, where they fragment it: the resident size
    ends up near 1 GB above what the step holds at once.

    "retain" never unmaps or trims (what jemalloc/tcmalloc do, as PyTorch's CPU
    performance guide recommends): no page faults on the per-step buffers, a fifth of a
    CPU step, but the resident size stays at its high-water mark. "return" fixes the mmap
    threshold at 1 MiB: every buffer from 1 MiB on has its own mapping and goes back to
    the OS when freed, so the heap stays small and the peak is what the step really holds.
    Returns False where the C library is not glibc (nothing changes then).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # from <malloc.h>
    if policy == "retain":
        return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
    if policy == "return":
        return bool(mallopt(m_mmap_threshold, 1 << 20))
    raise ValueError(f"train.host_memory: unknown policy {policy!r} (default, retain or return)")

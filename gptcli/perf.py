"""How fast the hardware can go: measured dense matmul throughput, for MFU.

MFU (model FLOPs utilisation) = model FLOPs per token x tokens/s / peak FLOP/s.
Vendors' datasheet peaks are rarely reachable (and unknown for most CPUs), so the
peak here is measured: the best of several large square matmuls in the training
dtype. It is measured once per device, dtype and thread count and cached.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from pathlib import Path

import torch


def cache_path() -> Path:
    root = os.environ.get("GPTCLI_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gptcli")
    return Path(root) / "peak_flops.json"


def device_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type}-threads{torch.get_num_threads()}"
    return f"{name}|{str(dtype).removeprefix('torch.')}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """Best FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs) over `reps` timed runs."""
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator().manual_seed(0)  # private: the global RNG stream stays untouched
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    a @ b  # warm-up: kernel selection, thread pool start
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The cached measured peak for this device/dtype, measuring it the first time."""
    path = cache_path()
    key = device_key(device, dtype)
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key])
    value = measure_matmul_flops(device, dtype)
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
    return value


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
    raise ValueError(f"unknown host memory policy {policy!r}")

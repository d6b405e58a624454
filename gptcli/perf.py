"""How fast the hardware can go: measured dense matmul throughput, for MFU.

MFU (model FLOPs utilisation) = model FLOPs per token x tokens/s / peak FLOP/s.
Vendors' datasheet peaks are rarely reachable (and unknown for most CPUs), so the
peak here is measured: the best of several large square matmuls in the training
dtype. It is measured once and cached per processor model (CPU model name and the
vector/matrix extensions the kernels use, or the GPU's name), thread count and dtype.
A peak measured while another job was running is too low; a run that goes faster
than it re-measures and corrects the cache (``MfuMeter``), and MFU above 100 % is
never reported.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from gptcli.device import cpu_info
from gptcli.fsio import atomic_write

# The extensions that decide which float32/bfloat16 matmul kernels run: two machines with
# the same model name but other firmware or VM settings can differ in these.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")


def cache_path() -> Path:
    root = os.environ.get("GPTCLI_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gptcli")
    return Path(root) / "peak_flops.json"


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, family and model numbers, and its matmul-relevant ISA flags,
    e.g. "AMD EPYC (family 26 model 2)+avx2+fma+avx512f+avx512_bf16".

    Virtual machines often report a bare "AMD EPYC": the family number is what tells a Zen 4
    (25) from a Zen 5 (26), whose bf16 matmuls differ by about 2x with the same flags.
    """
    fields = cpu_info(cpuinfo)
    present = set(fields.get("flags", "").split())
    flags = [flag for flag in ISA_FLAGS if flag in present]
    name = " ".join(fields.get("model name", "").split()) or platform.processor() or platform.machine() or "unknown-cpu"
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return "+".join([name, *flags])


def device_key(device: torch.device, dtype: torch.dtype) -> str:
    """The cache key of a peak: processor model, threads (CPU) and dtype."""
    if device.type == "cuda":
        name = f"cuda|{torch.cuda.get_device_name(device)}"
    elif device.type == "cpu":
        name = f"cpu|{cpu_model()}|threads{torch.get_num_threads()}"
    else:
        name = f"{device.type}|{platform.machine()}|{platform.processor()}"
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


def _read_cache() -> dict:
    try:
        cache = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(key: str, value: float) -> None:
    path = cache_path()
    cache = _read_cache()
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(cache, indent=2))
    except OSError:
        pass  # a read-only home: measure again next time


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The cached measured peak for this device/dtype, measuring it the first time."""
    key = device_key(device, dtype)
    cached = _read_cache().get(key)
    if isinstance(cached, (int, float)) and cached > 0:
        return float(cached)
    value = measure_matmul_flops(device, dtype)
    _write_cache(key, value)
    return value


def remeasure_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measure the peak again and cache the larger of it and the cached figure.

    A measured peak can be too low (measured in a busy moment), never too high: a
    matmul cannot run faster than the hardware, so the cache only ever goes up.
    """
    key = device_key(device, dtype)
    cached = _read_cache().get(key)
    value = max(measure_matmul_flops(device, dtype), float(cached) if isinstance(cached, (int, float)) else 0.0)
    _write_cache(key, value)
    return value


class MfuMeter:
    """MFU of an observed FLOP/s against a peak, never above 1.

    The first time a run observes more than the peak, a measured peak is measured
    again and the cache corrected (once per run: it costs a second or so, at a log
    point, never per step). If the model's FLOPs still exceed the peak (a peak set
    by hand, or a machine busy during both measurements), MFU is reported as None
    and `warn` is called once.

    Args:
        device, dtype: what the peak is for.
        peak: FLOP/s; None = no MFU.
        measured: the peak came from ``peak_flops`` (False: set by the user, train.peak_flops).
        warn: called with a one-line message.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, peak: float | None, measured: bool = True,
                 warn: Callable[[str], None] = lambda message: None):
        self.device, self.dtype, self.peak, self.measured, self.warn = device, dtype, peak, measured, warn
        self._remeasured = self._warned = False

    def __call__(self, flops_per_s: float) -> float | None:
        if not self.peak:
            return None
        if flops_per_s > self.peak and self.measured and not self._remeasured:
            self._remeasured = True
            try:
                self.peak = remeasure_peak(self.device, self.dtype)
            except RuntimeError:
                pass
        if flops_per_s <= self.peak:
            return flops_per_s / self.peak
        if not self._warned:
            self._warned = True
            source = "measured" if self.measured else "train.peak_flops"
            self.warn(f"MFU not reported: the model computes {flops_per_s / 1e9:.1f} GFLOP/s, above the peak "
                      f"of {self.peak / 1e9:.1f} GFLOP/s ({source}); the peak is too low")
        return None

"""Training metrics: one component measures the run and hands each record to the sinks.

``Metrics`` owns what a record reports beyond the loop's own numbers: throughput
(tokens/s over training time only, evaluation and checkpoints excluded), MFU
(``perf.MfuMeter``), peak memory of the host (the process's resident-size high-water
mark) and of the device (``torch.cuda.max_memory_allocated``), the time spent waiting
for data, and an ETA. It builds each record and calls ``write(record)`` on every sink
in ``sinks`` (a list the caller may extend: metrics.jsonl's ``report.MetricsLog`` and
the live CSV/plot ``report.LiveReport`` today, experiment loggers later); ``close()``
closes them all.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator, Protocol

import torch


class Sink(Protocol):
    """Where records go: one dict per "train" or "eval" event."""

    def write(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def peak_host_mb() -> float | None:
    """The process's peak resident size in MiB (getrusage's ru_maxrss), or None where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def peak_device_mb(device: torch.device) -> float | None:
    """Peak memory allocated by tensors on a CUDA device in MiB; None on other devices."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


class Metrics:
    """Measures a training session and emits its records to `sinks`.

    Args:
        sinks: objects with write(record) and close(); the caller may append more.
        device: where the model runs (for the device's peak memory).
        flops_per_token: model FLOPs of one training token (forward + backward), for MFU.
        world_size: processes; MFU is per process.
        mfu: a ``perf.MfuMeter`` or None (no MFU).
        total_steps: optimizer steps of the whole run (for the ETA).
        step, tokens_seen, elapsed_s: where the session starts (a resume's saved figures).
    """

    def __init__(self, sinks: list[Sink], device: torch.device, flops_per_token: float, world_size: int,
                 mfu: Callable[[float], float | None] | None, total_steps: int, step: int, tokens_seen: int,
                 elapsed_s: float):
        self.sinks = list(sinks)
        self.device, self.flops_per_token, self.world_size, self.mfu = device, flops_per_token, world_size, mfu
        self.total_steps, self.first_step, self.elapsed_before = total_steps, step, elapsed_s
        self.t_start = time.perf_counter()
        self._t_log, self._tokens_at_log = self.t_start, tokens_seen
        self._paused_since_log = 0.0  # evaluation and checkpoint time since the last train record
        self._data_wait = 0.0  # seconds waiting for batches since the last train record

    def elapsed(self) -> float:
        """Seconds of the whole run so far, earlier sessions included."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def waiting_for_data(self) -> contextlib.AbstractContextManager[None]:
        """Count the time inside as time waiting for data."""
        return self._timed("_data_wait")

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """Time inside (evaluation, samples, checkpoints) is not training time: throughput excludes it."""
        return self._timed("_paused_since_log")

    @contextlib.contextmanager
    def _timed(self, counter: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, counter, getattr(self, counter) + time.perf_counter() - t0)

    def train_record(self, step: int, epoch: int, tokens_seen: int, loss: float, lr: float,
                     grad_norm: float | None, loss_scale: float | None = None) -> dict[str, Any]:
        """The record of a log point: its figures cover the steps since the previous one."""
        now = time.perf_counter()
        rate = (tokens_seen - self._tokens_at_log) / max(now - self._t_log - self._paused_since_log, 1e-9)
        mfu = self.mfu(self.flops_per_token * rate / self.world_size) if self.mfu is not None else None
        record = {
            "event": "train", "step": step, "epoch": epoch, "tokens_seen": tokens_seen, "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "tokens_per_s": rate, "mfu": mfu, "elapsed_s": self.elapsed_before + now - self.t_start,
            **self._resources(step, now), **({"loss_scale": loss_scale} if loss_scale is not None else {}),
        }
        self._t_log, self._tokens_at_log, self._paused_since_log, self._data_wait = now, tokens_seen, 0.0, 0.0
        self.emit(record)
        return record

    def eval_record(self, **fields: Any) -> dict[str, Any]:
        """The record of an evaluation: `fields` (step, losses, ...) plus elapsed time."""
        record = {"event": "eval", **fields, "elapsed_s": self.elapsed()}
        self.emit(record)
        return record

    def _resources(self, step: int, now: float) -> dict[str, Any]:
        done = step - self.first_step
        # The session's mean wall time per step (evaluations and checkpoints included) times the steps left.
        eta = (now - self.t_start) / done * (self.total_steps - step) if done > 0 else None
        return {"peak_host_mb": peak_host_mb(), "peak_device_mb": peak_device_mb(self.device),
                "data_wait_s": self._data_wait, "eta_s": eta}

    def emit(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

"""The run directory while a run trains: its lock, its manifest (run.json), and the stop signals.

``resolve`` decides which run directory a command uses; this module owns what happens to it
while ``train`` holds it: check and create it, take its exclusive lock, clear it on
``overwrite`` (only a gptcli run's own files), record who trained it and on what (run.json),
and turn SIGINT/SIGTERM/SIGHUP into a flag the loop checks after each step.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from gptcli.checkpoint import clean_temporaries
from gptcli.errors import InputError, RunError, first_line
from gptcli.fsio import atomic_write, read_json_object
from gptcli.resolve import LOCK_FILES, RUN_FORMAT, RUN_JSON, clear_run, refuse_foreign

RUN_MANIFEST = RUN_JSON
LOCK, LOCK_PID = LOCK_FILES  # the run lock, and its holder's pid beside it
# Signals that save and stop: Ctrl-C, kill/SLURM/Kubernetes, a closed terminal or ssh session.
# Windows has no SIGHUP: a signal this platform lacks is skipped.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
LOCK_PROBE_WAIT_S = 1.0  # how long train retries a run lock that a reader's probe may hold


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> "RunLock":
    """Check the run directory, create it, take its lock; returns the held lock.

    Only a gptcli run (recognised by its own files, see resolve.foreign_entries) is ever
    continued or cleared: a folder holding anything else is refused, and nothing is deleted.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: exists and is not a directory")
    refuse_foreign(run_dir)
    existing = run_dir.is_dir() and any(p.name not in LOCK_FILES for p in run_dir.iterdir())
    if resume and not existing:
        raise InputError(f"resume=True: {run_dir} has no checkpoint to resume from")
    if existing and not resume and not overwrite:
        raise InputError(f"{run_dir}: a gptcli run exists there; pass resume=True to continue it or overwrite=True "
                         "to start it over")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".tmp-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{run_dir}: output directory is not writable ({e.strerror})") from None
    lock = lock_run(run_dir)
    if overwrite and not resume:
        clear_run(run_dir)
    clean_temporaries(run_dir)
    return lock


def lock_run(run_dir: Path) -> "RunLock":
    """An exclusive lock on RUN/.lock, our pid in RUN/.lock.pid; the OS drops the lock when the holder dies.

    Through ``filelock`` (flock on POSIX, LockFileEx on Windows). The pid lives in a side
    file because a locked file cannot be read on Windows and filelock truncates its own.
    """
    import filelock

    lock = filelock.FileLock(str(run_dir / LOCK), thread_local=False)
    try:
        _acquire(lock, filelock.Timeout)
    except filelock.Timeout:
        try:
            holder = (run_dir / LOCK_PID).read_text(encoding="utf-8").strip() or "another process"
        except OSError:
            holder = "another process"
        raise RunError(f"{run_dir}: in use by gptcli train (pid {holder}); wait for it or choose another "
                       "run directory") from None
    (run_dir / LOCK_PID).write_text(str(os.getpid()), encoding="utf-8")
    return RunLock(lock)


def _acquire(lock, timeout_error) -> None:
    """Take `lock` now, or within LOCK_PROBE_WAIT_S: `gptcli runs` and `plot` ask whether a run trains by taking
    its lock for an instant (runs.lock_held), and a trainer starting in that instant must not refuse the run."""
    deadline = time.monotonic() + LOCK_PROBE_WAIT_S
    while True:
        try:
            return lock.acquire(timeout=0)
        except timeout_error:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


class RunLock:
    """The held run lock; close() releases it."""

    def __init__(self, lock):
        self._lock = lock

    def close(self) -> None:
        self._lock.release()


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """run.json of `run_dir`, or {} when it is missing or unreadable."""
    return read_json_object(run_dir / RUN_MANIFEST)


def write_run_manifest(run_dir: Path, cfg, splits, device: torch.device, world_size: int,
                       resumed_at: int | None) -> None:
    """run.json: who started the run, with what code, on which corpus; each resume appends a line."""
    manifest = read_manifest(run_dir)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if resumed_at is None or not manifest:
        manifest = {
            "format": RUN_FORMAT,  # what marks the folder as a gptcli run (resolve.foreign_entries)
            "version": 1,
            "started": now,
            "command": sys.argv,
            "config_source": cfg.source,
            "git_commit": git_commit(),
            "versions": versions(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "world_size": world_size,
            "corpus": _corpus(splits),
            "resumes": [],
        }
    else:
        manifest = {"format": RUN_FORMAT, "version": 1, **manifest}  # a run.json from before the marker gets it
        resume = {"at_step": resumed_at, "time": now, "command": sys.argv, "device": str(device),
                  "world_size": world_size}
        corpus = _corpus(splits)
        if (manifest.get("corpus") or {}).get("sha256") != corpus["sha256"]:  # allow_data_change: from here
            resume["corpus"] = manifest["corpus"] = corpus  # on, the run trains on this one
        manifest.setdefault("resumes", []).append(resume)
    manifest.update(state="running", ended_at=None)  # until record_end says how it ended
    atomic_write(run_dir / RUN_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _corpus(splits) -> dict[str, Any]:
    """run.json's record of the corpus: what a resume checks its data against."""
    return {"path": splits.source, "sha256": splits.sha256, "train_tokens": splits.train_tokens,
            "val_tokens": splits.val_tokens, "train_windows": len(splits.train)}


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("gptcli", "torch", "tiktoken", "numpy", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


class StopSignals:
    """Turn the first SIGINT/SIGTERM/SIGHUP into a flag the loop checks after each step.

    A second SIGINT stops at once (KeyboardInterrupt); the checkpoints already on
    disk stay valid because every write is atomic. Inside ``held()`` (the final CSV and
    plot, the record of how the run ended: a second or so) it waits like the others.
    ``install()`` sets the handlers, only on the main thread (Python allows no other);
    ``restore()`` puts the previous ones back. Train keeps them until the run's end is
    recorded, so a signal during that teardown is a flag too, never the default action.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._held = False

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT and not self._held:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                s = getattr(signal, name, None)
                if s is None or s in self._old:
                    continue
                try:
                    self._old[s] = signal.signal(s, self._handle)
                except (OSError, ValueError, RuntimeError):  # a signal this platform cannot handle
                    continue
        return self

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Inside, a second Ctrl-C also only sets the flag: for short work that must complete."""
        self._held = True
        try:
            yield
        finally:
            self._held = False

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()
        return False


def record_end(run_dir: Path, error: Optional[BaseException]) -> None:
    """Record in RUN/run.json how the run ended: finished (`error` None), stopped by a signal after saving
    (``Interrupted``), interrupted at once by a second Ctrl-C (KeyboardInterrupt), or failed.

    Called by train with the run lock held. Never raises: a disk that cannot take this
    record must not hide how the run really ended; `gptcli runs` then says interrupted.
    """
    path = run_dir / RUN_MANIFEST
    manifest = read_manifest(run_dir)
    if not manifest:
        return  # the run stopped before it wrote run.json: nothing of it to describe
    signum = getattr(error, "signum", None)
    if error is None:
        end: dict[str, Any] = {"state": "finished"}
    elif isinstance(error, KeyboardInterrupt):
        # A second Ctrl-C stops at once: nothing is saved at the stop (steps after the newest checkpoint are lost).
        end = {"state": "interrupted", "signal": "SIGINT"}
    elif signum is not None:
        end = {"state": "stopped", "signal": signal.Signals(signum).name}
    else:
        end = {"state": "failed", "error": first_line(error) or type(error).__name__}
    manifest.pop("signal", None)
    manifest.pop("error", None)
    manifest.update(end, ended_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    try:
        atomic_write(path, json.dumps(manifest, indent=2) + "\n")
    except OSError:
        pass

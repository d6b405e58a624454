"""Runs side by side: how each run ended, its figures, the config keys in which runs differ.

A run's state comes from its own files and its lock, never from guessing at processes:

- ``running``: another process holds RUN/.lock (the OS drops it when the holder dies);
- ``finished`` / ``stopped`` (by a signal) / ``failed``: the end-state that ``train`` records in
  RUN/run.json (``state``, ``ended_at``, and the signal or the error) when it returns or raises;
- ``interrupted``: run.json still says ``running`` but nobody holds the lock: the process was
  killed (SIGKILL, out of memory, power loss) before it could say how it ended; or run.json says
  ``interrupted`` (signal SIGINT): a second Ctrl-C stopped it at once, without saving.

Runs written before the end-state existed are judged by their newest checkpoint's reason.
Library code: nothing here prints or exits.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Optional

from gptcli.checkpoint import CONFIG, MANIFEST, list_step_checkpoints
from gptcli.errors import InputError, RunError
from gptcli.fsio import atomic_write, read_json_object
from gptcli.report import CSV, METRICS, PLOT, load_plotting, read_metrics, render
from gptcli.resolve import LOCK_FILES, RUN_FILES, foreign_entries, is_run_dir

RUN_JSON = RUN_FILES[0]  # run.json, written by train
LOCK, LOCK_PID = LOCK_FILES
STATES = ("running", "finished", "stopped", "failed", "interrupted")
X_AXES = {"step": ("step", "Step"), "tokens": ("tokens_seen", "Tokens seen"), "time": ("elapsed_s", "Seconds")}
PLOT_MARK = "gptcli compare"  # in the PNG's Software field: a plot we may redraw


# ---------------------------------------------------------------- the end-state (train writes it)


# ---------------------------------------------------------------- one run


NOT_A_RUN = f"not a gptcli run (no {RUN_JSON} written by gptcli, no checkpoint of its own)"


def lock_held(run_dir: Path) -> Optional[bool]:
    """Whether a process holds RUN/.lock now (a non-blocking try); None when it cannot be tried."""
    import filelock

    path = run_dir / LOCK
    if not path.is_file():
        return False  # train creates it before anything else: no lock file, no training process
    if not os.access(path, os.R_OK | os.W_OK):
        return None
    lock = filelock.FileLock(str(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    except OSError:
        return None
    lock.release()
    return False


def run_state(run_dir: Path) -> dict[str, Any]:
    """{"state", and "pid" / "signal" / "error" / "ended_at" where known} of one run."""
    manifest = read_json_object(run_dir / RUN_JSON)
    held = lock_held(run_dir)
    if held:
        pid = _read_text(run_dir / LOCK_PID)
        return {"state": "running", **({"pid": int(pid)} if pid and pid.isdigit() else {})}
    state = manifest.get("state")
    if state in ("finished", "stopped", "failed", "interrupted"):
        return {k: manifest[k] for k in ("state", "signal", "error", "ended_at") if manifest.get(k) is not None}
    if state == "running":
        return {"state": "interrupted"}  # no end-state and no lock holder: killed
    # A run from before end-states: its newest checkpoint's reason says how far it got.
    steps = list_step_checkpoints(run_dir)
    reason = read_json_object(steps[-1] / MANIFEST).get("reason") if steps else None
    return {"state": {"end": "finished", "interrupt": "stopped"}.get(reason, "interrupted")}


def redraw(run_dir: Path, baseline: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    """A run's losses.png, and its metrics.csv unless the run is training (``report.render``'s paths).

    A training run appends each record to its metrics.csv: a new file put in its place would
    lose those rows, so while a process holds the run's lock the CSV is left to it (no "csv").

    Raises:
        InputError: `run_dir` is not a gptcli run, or its metrics.csv or losses.png is a file gptcli
            did not write (neither is ever overwritten).
        RunError: the files cannot be written (full disk, read-only folder).
    """
    if not is_run_dir(run_dir):
        raise InputError(f"{run_dir}: {NOT_A_RUN}; gptcli plot writes {CSV} and {PLOT} only into its own runs")
    foreign = [name for name in (CSV, PLOT) if name in foreign_entries(run_dir)]
    if foreign:
        raise InputError(f"{run_dir / foreign[0]}: not a file gptcli wrote; gptcli never overwrites it "
                         f"(move it away, or draw with --out FILE.png)")
    try:
        return render(run_dir, baseline, with_csv=not lock_held(run_dir))
    except OSError as e:  # a full disk, a read-only folder: the earlier files stay as they were
        raise RunError(f"{run_dir}: cannot write {CSV} and {PLOT} ({e.strerror or e})") from None


def summarize(run_dir: Path) -> dict[str, Any]:
    """One run's row: state, steps, tokens, last and best validation loss, task accuracy, tokens/s, wall time.

    Raises:
        InputError: `run_dir` is not a gptcli run directory.
    """
    if not is_run_dir(run_dir):
        raise InputError(f"{run_dir}: {NOT_A_RUN}")
    events = read_metrics(run_dir / METRICS) if (run_dir / METRICS).is_file() else []
    trains = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval" and _finite(e.get("val_loss"))]
    last = events[-1] if events else {}
    rates = [e["tokens_per_s"] for e in trains if _finite(e.get("tokens_per_s"))]
    tasks = next((e["tasks"] for e in reversed(events) if isinstance(e.get("tasks"), dict)), None)
    return {
        "name": run_dir.name, "path": str(run_dir), **run_state(run_dir),
        "steps": last.get("step"), "tokens_seen": last.get("tokens_seen"),
        "train_loss": trains[-1].get("loss") if trains else None,
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min(e["val_loss"] for e in evals) if evals else None,
        "tasks": {name: v.get("acc") for name, v in tasks.items() if isinstance(v, dict)} if tasks else None,
        # the median: the first step's compile and warm-up and a slow evaluation step do not move it
        "tokens_per_s": statistics.median(rates) if rates else None,
        "wall_s": last.get("elapsed_s"),
    }


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config as flat dotted keys, from its newest checkpoint ({} before the first one)."""
    import yaml

    candidates = [*reversed(list_step_checkpoints(run_dir)), run_dir / "best"]
    for ckpt in candidates:
        try:
            raw = yaml.safe_load((ckpt / CONFIG).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(raw, dict):
            return {f"{section}.{k}": v for section, values in raw.items() if isinstance(values, dict)
                    for k, v in values.items()}
    return {}


def config_differences(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{dotted key: {run: value}} for every key whose value is not the same in all runs that have a config."""
    known = {name: c for name, c in configs.items() if c}
    keys = sorted({k for c in known.values() for k in c})
    return {k: {name: c.get(k) for name, c in known.items()} for k in keys
            if len({json.dumps(c.get(k, "<absent>"), sort_keys=True, default=str) for c in known.values()}) > 1}


# ---------------------------------------------------------------- several runs


def find_runs(root: Path) -> list[Path]:
    """The run directories under `root` (its direct sub-folders that are runs, or `root` itself).

    Raises:
        InputError: `root` does not exist.
    """
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (give the folder that holds the runs)")
    if is_run_dir(root):
        return [root]
    return sorted(p for p in root.iterdir() if not p.is_symlink() and is_run_dir(p))


def list_runs(root: Path) -> dict[str, Any]:
    """{"root", "runs": [summary...], "differences": {key: {run: value}}} of the runs under `root`."""
    runs = find_runs(root)
    names = _unique_names(runs)
    rows = [{**summarize(p), "name": n} for p, n in zip(runs, names)]
    return {"root": str(root), "runs": rows,
            "differences": config_differences({n: run_config(p) for p, n in zip(runs, names)})}


def compare(run_dirs: list[Path]) -> dict[str, Any]:
    """{"runs": [summary...], "differences": {key: {run: value}}} of the given runs, in the order given.

    Raises:
        InputError: a path that is not a gptcli run, or fewer than one run.
    """
    if not run_dirs:
        raise InputError("RUN: give at least one run directory")
    names = _unique_names(run_dirs)
    rows = [{**summarize(p), "name": n} for p, n in zip(run_dirs, names)]
    return {"runs": rows, "differences": config_differences({n: run_config(p) for p, n in zip(run_dirs, names)})}


def plot_runs(run_dirs: list[Path], out: Path, x: str = "tokens") -> Path:
    """One PNG with every run's training loss (solid) and validation loss (dashed) against `x`.

    Args:
        x: "step", "tokens" (tokens seen) or "time" (training seconds).

    Raises:
        InputError: an unknown `x`, a path that is not a run, or an `out` file gptcli did not draw.
        RunError: `out` cannot be written (full disk, read-only folder).
    """
    if x not in X_AXES:
        raise InputError(f"--x {x}: choose one of {', '.join(X_AXES)}")
    key, label = X_AXES[x]
    refuse_foreign_plot(out)
    import io

    plt = load_plotting()

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (run, name) in enumerate(zip(run_dirs, _unique_names(run_dirs))):
        if not (run / METRICS).is_file():
            raise InputError(f"{run}: no {METRICS} (not a run directory?)")
        events = read_metrics(run / METRICS)
        color = f"C{i % 10}"
        trains = [e for e in events if e.get("event") == "train" and key in e]
        evals = [e for e in events if e.get("event") == "eval" and key in e]
        ax.plot([e[key] for e in trains], [_nan(e.get("loss")) for e in trains], color=color, alpha=0.6,
                linewidth=1, label=f"{name} train")
        ax.plot([e[key] for e in evals], [_nan(e.get("val_loss")) for e in evals], color=color, linestyle="--",
                marker="o", markersize=3, label=f"{name} val")
    ax.set_xlabel(label)
    ax.set_ylabel("Loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, metadata={"Software": PLOT_MARK})
    plt.close(fig)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, buf.getvalue())
    except OSError as e:  # a full disk, a read-only folder: no half-written plot, no temporary left
        raise RunError(f"{out}: cannot write the plot ({e.strerror or e})") from None
    return out


def refuse_foreign_plot(out: Path) -> None:
    """Refuse to overwrite `out` unless it is a plot that gptcli compare drew (its PNG says so)."""
    if not out.exists():
        return
    try:
        head = out.read_bytes()[:4096] if out.is_file() else b""
    except OSError:
        head = b""
    if PLOT_MARK.encode() not in head:
        raise InputError(f"--out {out}: exists and is not a plot gptcli drew; gptcli never overwrites it; "
                         "choose another file")


def default_plot_path(run_dirs: list[Path]) -> Path:
    """Where the comparison plot goes without --out: beside the first run, named after the runs."""
    names = "-vs-".join(_unique_names(run_dirs))[:120]
    return _named(run_dirs[0]).parent / f"compare-{names}.png"


def _named(path: Path) -> Path:
    """`path` spelled so that its last part is the folder's own name (`.`, `..`, `run/.`: made absolute)."""
    normal = Path(os.path.normpath(path))
    return normal if normal.name not in ("", "..") else Path(os.path.abspath(path))


def _unique_names(runs: list[Path]) -> list[str]:
    names = [_named(p).name or str(p) for p in runs]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in runs]


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _nan(x: Any) -> float:
    return x if _finite(x) else float("nan")

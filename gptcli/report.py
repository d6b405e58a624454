"""Loss reports: metrics.jsonl is the record; metrics.csv and losses.png render from it.

Each line of metrics.jsonl is one event: ``{"event": "train", ...}`` at log
intervals and ``{"event": "eval", ...}`` at evaluations, with step, epoch,
tokens_seen, losses, learning rate, throughput and elapsed seconds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
CSV = "metrics.csv"
PLOT = "losses.png"
CSV_COLUMNS = [
    "event", "step", "epoch", "tokens_seen", "loss", "train_loss", "val_loss",
    "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s",
]


class MetricsLog:
    """Append-only metrics.jsonl, flushed per line so a killed run keeps what it logged."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / METRICS
        if resume_step is not None and self.path.exists():
            # Events after the checkpoint we resume from will be logged again: drop them.
            kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Events of a metrics.jsonl; a last line cut short by a crash is ignored."""
    events = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def write_csv(events: list[dict[str, Any]], path: Path) -> None:
    """One row per event with the CSV_COLUMNS (empty where an event lacks a field)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for e in events:
        writer.writerow({k: ("" if e.get(k) is None else e.get(k)) for k in CSV_COLUMNS})
    _atomic_write(path, buf.getvalue().encode("utf-8"))


def plot_losses(events: list[dict[str, Any]], path: Path, baseline: dict[str, Any] | None = None,
                corpus_sha256: str | None = None) -> None:
    """The book's plot: training and validation loss against epochs, with a tokens-seen axis.

    Epochs are fractional (epoch index + fraction of the epoch done) so evaluations
    inside an epoch land where they happened. Evaluations that scored tasks add a
    second panel: accuracy against tokens seen. A `baseline` (one size of
    gptcli/baselines.json) draws its figures as labelled horizontal lines; its loss
    only where `corpus_sha256` is the data it was measured on.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    evals = [e for e in events if e.get("event") == "eval"]
    epochs = [e.get("epoch_progress", e.get("epoch", 0)) for e in evals]
    tokens = [e.get("tokens_seen", 0) for e in evals]
    train = [_finite(e.get("train_loss")) for e in evals]
    val = [_finite(e.get("val_loss")) for e in evals]
    scored = [e for e in evals if e.get("tasks")]
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(10 if scored else 5, 3), squeeze=False)
    ax1 = axes[0][0]
    ax1.plot(epochs, train, label="Training loss")
    ax1.plot(epochs, val, linestyle="-.", label="Validation loss")
    loss_line = (baseline or {}).get("val_loss") or {}
    if loss_line.get("data_sha256") and loss_line["data_sha256"] == corpus_sha256:
        ax1.axhline(loss_line["value"], color="r", linestyle="--", label=f"{baseline['model']} val loss")
    if scored:
        _plot_tasks(axes[0][1], scored, baseline)
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # a second x-axis sharing the y-axis: tokens seen
    ax2.plot(tokens, train, alpha=0)  # invisible, aligns the ticks
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def _plot_tasks(ax, scored: list[dict[str, Any]], baseline: dict[str, Any] | None) -> None:
    """Second panel: each task's acc_norm against tokens seen, and the baseline's figure for it."""
    for name in sorted({n for e in scored for n in e["tasks"]}):
        points = [(e.get("tokens_seen", 0), e["tasks"][name]["acc_norm"]) for e in scored if name in e["tasks"]]
        ax.plot(*zip(*points), marker=".", label=f"{name} acc_norm")
        line = ((baseline or {}).get("tasks") or {}).get(name)
        if line:
            ax.axhline(line["acc_norm"], color="r", linestyle="--", label=f"{baseline['model']} ({line['method']})")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Accuracy")
    ax.legend(loc="lower right", fontsize="small")


def render(run_dir: Path, baseline: dict[str, Any] | None = None) -> dict[str, Path]:
    """Redraw metrics.csv and losses.png of a run from its metrics.jsonl (with `baseline`'s lines, if given)."""
    events = read_metrics(run_dir / METRICS)
    write_csv(events, run_dir / CSV)
    corpus = None
    if baseline is not None and (run_dir / "run.json").is_file():
        try:
            corpus = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("corpus", {}).get("sha256")
        except (OSError, ValueError):
            corpus = None
    plot_losses(events, run_dir / PLOT, baseline, corpus)
    return {"metrics": run_dir / METRICS, "csv": run_dir / CSV, "plot": run_dir / PLOT}


def _finite(x: Any) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else float("nan")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

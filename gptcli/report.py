"""Loss reports: metrics.jsonl is the record; metrics.csv and losses.png render from it.

Each line of metrics.jsonl is one event: ``{"event": "train", ...}`` at log
intervals and ``{"event": "eval", ...}`` at evaluations, with step, epoch,
tokens_seen, losses, learning rate, throughput, memory and elapsed seconds.

During training ``LiveReport`` keeps both up to date at a cost that does not grow with
the run: it appends each record's CSV row and redraws the plot from the evaluations it
holds in memory, at most once per ``plot_interval_s`` and always when it closes.
``render`` redraws both from metrics.jsonl (``gptcli plot``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from gptcli.fsio import atomic_write, sync

METRICS = "metrics.jsonl"
CSV = "metrics.csv"
PLOT = "losses.png"
CSV_COLUMNS = [
    "event", "step", "epoch", "tokens_seen", "loss", "train_loss", "val_loss",
    "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s", "peak_host_mb", "peak_device_mb", "data_wait_s", "eta_s",
]


class MetricsLog:
    """Append-only metrics.jsonl, flushed per line so a killed run keeps what it logged."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / METRICS
        if resume_step is not None and self.path.exists():
            # Events after the checkpoint we resume from will be logged again: drop them.
            kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= resume_step]
            atomic_write(self.path, "".join(json.dumps(e) + "\n" for e in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()

    def close(self) -> None:
        # Flushed per line (a killed process loses nothing); fsynced once at the end, since
        # an fsync per line would cost a disk round trip at every log interval.
        try:
            sync(self._file)
        finally:
            self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Events of a metrics.jsonl; a line that is no JSON object (cut short by a crash, a damaged block) is ignored."""
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:  # bytes that are not UTF-8 fail as JSON, below
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.append(event)
    return events


def write_csv(events: list[dict[str, Any]], path: Path) -> None:
    """One row per event with the CSV_COLUMNS (empty where an event lacks a field)."""
    atomic_write(path, _csv_text(events, header=True))


def _csv_text(events: list[dict[str, Any]], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    if header:
        writer.writeheader()
    for e in events:
        writer.writerow({k: ("" if e.get(k) is None else e.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


class LiveReport:
    """A metrics sink that keeps metrics.csv and losses.png current while a run trains.

    metrics.jsonl is read once, when the report opens (a resumed run's earlier events);
    after that each record appends one CSV row and evaluations are kept in memory (a
    few numbers each), so the work per record does not depend on how long the run is.
    The plot is redrawn at a new run's first evaluation, then at most once per
    `plot_interval_s` (and never more often than every 20 drawing times), and on close()
    when it missed an evaluation.

    The CSV is the run's while it trains (``gptcli plot`` leaves it alone then). Should it be
    replaced all the same (a new file at its path: an older gptcli's plot, a script), the next
    record or close() finds out (one stat) and rewrites it from metrics.jsonl, whose first
    ``rows_written`` events are exactly the rows written, instead of appending to a file no
    longer there.

    ``rows_read`` and ``rows_written`` count metrics lines read and CSV rows written.
    """

    def __init__(self, run_dir: Path, plot_interval_s: float = 60.0):
        self.csv_path, self.plot_path = run_dir / CSV, run_dir / PLOT
        self.plot_interval_s = plot_interval_s
        events = read_metrics(run_dir / METRICS) if (run_dir / METRICS).exists() else []
        self.rows_read = len(events)
        self.evals = [e for e in events if e.get("event") == "eval"]
        self.metrics_path = run_dir / METRICS
        self.rows_written = 0
        self._csv = self._rewrite(events)
        # A new run plots its first evaluation at once; a resumed one has its plot, redrawn at the cadence.
        self._next_plot = time.perf_counter() + plot_interval_s if self.evals else 0.0
        self._stale = False

    def write(self, record: dict[str, Any]) -> None:
        self._keep_csv()
        self._csv.write(_csv_text([record], header=False))
        self._csv.flush()
        self.rows_written += 1
        if record.get("event") == "eval":
            self.evals.append(record)
            self._stale = True
            if time.perf_counter() >= self._next_plot:
                self._plot()

    def close(self) -> None:
        self._keep_csv()
        self._csv.close()
        if self._stale:
            self._plot()

    def _rewrite(self, events: list[dict[str, Any]]):
        """metrics.csv anew with `events`; returns it open for appending."""
        write_csv(events, self.csv_path)
        self.rows_written = len(events)
        return open(self.csv_path, "a", encoding="utf-8", newline="")

    def _keep_csv(self) -> None:
        """Rewrite metrics.csv when the file we append to is no longer the one at its path."""
        try:
            here = os.stat(self.csv_path)
        except FileNotFoundError:
            here = None
        ours = os.fstat(self._csv.fileno())
        if here is not None and (here.st_ino, here.st_dev) == (ours.st_ino, ours.st_dev):
            return
        events = read_metrics(self.metrics_path)[:self.rows_written] if self.metrics_path.exists() else []
        self.rows_read += len(events)
        self._csv.close()
        self._csv = self._rewrite(events)

    def _plot(self) -> None:
        t0 = time.perf_counter()
        plot_losses(self.evals, self.plot_path)
        took = time.perf_counter() - t0
        self._next_plot = t0 + max(self.plot_interval_s, 20 * took)  # plotting stays under ~5 % of the run
        self._stale = False


def load_plotting():
    """matplotlib.pyplot on its file-only backend (Agg): plots are written, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(events: list[dict[str, Any]], path: Path, baseline: dict[str, Any] | None = None,
                corpus_sha256: str | None = None) -> None:
    """The book's plot: training and validation loss against epochs, with a tokens-seen axis.

    Epochs are fractional (epoch index + fraction of the epoch done) so evaluations
    inside an epoch land where they happened. Evaluations that scored tasks add a
    second panel: accuracy against tokens seen. A `baseline` (one size of
    gptcli/baselines.json) draws its figures as labelled horizontal lines; its loss
    only where `corpus_sha256` is the data it was measured on.
    """
    from matplotlib.ticker import MaxNLocator

    plt = load_plotting()

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
    atomic_write(path, buf.getvalue())


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


def render(run_dir: Path, baseline: dict[str, Any] | None = None, with_csv: bool = True) -> dict[str, Path]:
    """Redraw metrics.csv and losses.png of a run from its metrics.jsonl (with `baseline`'s lines, if given).

    Args:
        with_csv: False leaves metrics.csv alone (a run that trains appends to it) and returns no "csv".
    """
    events = read_metrics(run_dir / METRICS)
    if with_csv:
        write_csv(events, run_dir / CSV)
    corpus = None
    if baseline is not None and (run_dir / "run.json").is_file():
        try:
            corpus = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("corpus", {}).get("sha256")
        except (OSError, ValueError):
            corpus = None
    plot_losses(events, run_dir / PLOT, baseline, corpus)
    return {"metrics": run_dir / METRICS, **({"csv": run_dir / CSV} if with_csv else {}), "plot": run_dir / PLOT}


def _finite(x: Any) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else float("nan")


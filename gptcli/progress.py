"""Progress on stderr for train, download and prepare: one renderer, imported only by cli.py.

`Renderer` owns the one choice between the two kinds of output: on a terminal a rich bar
per task that updates in place, with other lines printed above the bars; otherwise plain
lines, which a log file or CI keeps readable (each caller says which updates deserve one). The three adapters below turn what each library call reports
(train's `Events`, a download's byte counts, prepare's byte and token counts) into
`Renderer` calls and say nothing else about how it is shown.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


def err(message: str) -> None:
    """One plain line on stderr (no markup, no wrapping)."""
    print(message, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """A short duration: 42s, 3m05s, 2h07m."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Renderer:
    """Tasks with a total, shown as rich bars on a terminal or as plain lines otherwise.

    Args:
        tty: terminal output (default: whether stderr is a terminal).
        silent: show nothing (the processes other than rank 0 under torchrun: rank 0 speaks for all).
    """

    def __init__(self, tty: Optional[bool] = None, silent: bool = False):
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.silent = silent
        self._bars = None  # rich.progress.Progress, started with the first task on a terminal
        self._tasks: dict[str, Any] = {}

    def add(self, label: str, total: Optional[float], *, unit: str = "steps", completed: float = 0) -> bool:
        """Start a task (False: it was started before); `unit` "bytes" shows sizes, "steps" a count."""
        if label in self._tasks or self.silent:
            return False
        if not self.tty:
            self._tasks[label] = None
            return True
        if self._bars is None:
            from rich.console import Console
            from rich.progress import Progress

            self._bars = Progress(*_bar_columns(), console=Console(stderr=True, highlight=False), transient=False)
            self._bars.start()
        self._tasks[label] = self._bars.add_task(label, total=total, completed=completed, status="", unit=unit)
        return True

    def update(self, label: str, completed: float, total: Optional[float] = None, *, status: str = "",
               plain: Optional[str] = None) -> None:
        """Move a task on: its bar on a terminal; otherwise the line `plain`, if given."""
        if self.silent:
            return
        if self.tty:
            kwargs = {"total": total} if total is not None else {}
            self._bars.update(self._tasks[label], completed=completed, status=status, **kwargs)
        elif plain is not None:
            err(plain)

    def line(self, text: str) -> None:
        """A line of its own: above the bars on a terminal, else on stderr as it is."""
        if self.silent:
            return
        if self._bars is not None:
            self._bars.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            err(text)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bar_columns():
    """The rich columns: a label, the bar, the count (bytes or steps), a status text, the time left."""
    from rich.table import Column
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, ProgressColumn, TextColumn,
                               TimeRemainingColumn)

    class Count(ProgressColumn):  # bytes as sizes, steps as N/M, chosen per task
        def __init__(self):
            super().__init__(table_column=Column(no_wrap=True))
            self._bytes, self._steps = DownloadColumn(), MofNCompleteColumn()

        def render(self, task):
            return (self._bytes if task.fields.get("unit") == "bytes" else self._steps).render(task)

    # No column wraps: on a narrow terminal they are cut short with an ellipsis, one line per task.
    return (TextColumn("{task.description}", table_column=Column(no_wrap=True)), Count(), BarColumn(bar_width=24),
            TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
            TimeRemainingColumn(table_column=Column(no_wrap=True)))


# ---------------------------------------------------------------- adapters


class _Closing:
    """`with adapter:` closes its renderer on the way out (before an error is reported)."""

    r: Renderer

    def close(self) -> None:
        self.r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrainProgress(_Closing):
    """gptcli.train.Events rendered: a bar of steps, the book's evaluation lines, samples, warnings.

    Plain lines (not a terminal) carry the elapsed time and the time left: the record's
    ``eta_s`` when the loop reports one, else estimated from the steps done so far.
    """

    def __init__(self, notes: Sequence[str] = (), corpus: Optional[str] = None, *, quiet: bool = False,
                 renderer: Optional[Renderer] = None, clock: Callable[[], float] = time.perf_counter):
        self.notes = list(notes)  # the choices the tool made, said once the inputs checked out
        self.r = renderer or Renderer(silent=quiet)
        self.clock = clock
        self.total = 0
        self.first_step = 0
        self.t0 = clock()
        self.last_val: Optional[float] = None
        self.download = corpus_download(self.r, corpus)

    def start(self, info: dict[str, Any]) -> None:
        for note in self.notes:
            self.r.line(note)
        self.total, self.first_step, self.t0 = info["total_steps"], info["step"], self.clock()
        what = "resuming" if info["resumed"] else "training"
        self.r.line(f"{what} {info['params'] / 1e6:.1f}M parameters on {info['device']}"
                    f"{' x' + str(info['world_size']) if info['world_size'] > 1 else ''}: "
                    f"{info['train_tokens']} training / {info['val_tokens']} validation tokens, "
                    f"{info['total_steps']} steps -> {info['run_dir']}")
        self.r.add("step", self.total, completed=info["step"])

    def log(self, r: dict[str, Any]) -> None:
        mfu = f" · MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
        val = f" · val {self.last_val:.3f}" if self.last_val is not None else ""
        status = (f"epoch {r['epoch']} · loss {r['loss']:.3f}{val} · lr {r['lr']:.2e} · "
                  f"{r['tokens_per_s']:,.0f} tok/s{mfu}")
        host = f" · host {r['peak_host_mb']:,.0f} MB" if r.get("peak_host_mb") else ""
        self.r.update("step", r["step"], status=status,
                      plain=f"step {r['step']}/{self.total} · {status}{host} · {self._times(r)}")

    def _times(self, r: dict[str, Any]) -> str:
        elapsed = self.clock() - self.t0
        eta = r.get("eta_s")
        if eta is None:
            done = r["step"] - self.first_step
            eta = elapsed / done * (self.total - r["step"]) if done > 0 else None
        return f"elapsed {duration(elapsed)} · ETA {duration(eta) if eta is not None else '?'}"

    def eval(self, r: dict[str, Any]) -> None:
        self.last_val = r["val_loss"]
        # The book's line; its step counter starts at 0 for the first optimizer step. The book
        # has no evaluation of the final weights: that line says "End" instead of "Ep N".
        where = f"End (Ep {r['epoch']}, " if r.get("final") else f"Ep {r['epoch']} ("
        tasks = "".join(f", {name} acc {t['acc']:.3f} acc_norm {t['acc_norm']:.3f}" for name, t in r.get("tasks", {}).items())
        self.r.line(f"{where}Step {r['step'] - 1:06d}): "
                    f"Train loss {r['train_loss']:.3f}, Val loss {r['val_loss']:.3f}{tasks}")

    def sample(self, epoch: int, text: str) -> None:
        self.r.line(text)

    def checkpoint(self, path: Path) -> None:
        if not self.r.tty:
            self.r.line(f"saved {path}")

    def warn(self, message: str) -> None:
        self.r.line(f"warning: {message}")

    def note(self, message: str) -> None:
        self.r.line(message)


def download_progress(renderer: Renderer) -> Callable[[str, int, Optional[int]], None]:
    """A download callback (label, bytes done, total): a bar per file, or one line as each file starts."""

    def report(label: str, done: int, total: Optional[int]) -> None:
        if renderer.add(label, total, unit="bytes") and not renderer.tty:
            renderer.line(f"downloading {label}" + (f" ({total:,} bytes)" if total else ""))
        renderer.update(label, done, total)

    return report


def corpus_download(renderer: Renderer, corpus: Optional[str]) -> Callable[[int, Optional[int]], None]:
    """The callback (bytes done, total) for the book's corpus, which train and loss download when missing."""

    def report(done: int, total: Optional[int]) -> None:
        if renderer.add(CORPUS_LABEL, total, unit="bytes"):  # once: where the default corpus goes
            renderer.line(f"downloading the book's corpus to {corpus} (data.path)")
        renderer.update(CORPUS_LABEL, done, total)

    return report


CORPUS_LABEL = "the-verdict.txt"


TTY_EVERY_S, PLAIN_EVERY_S = 0.5, 10.0  # prepare's rate measurements: a live bar, a log file's line


class PrepareProgress(_Closing):
    """prepare's callback (bytes done, bytes total, tokens written): input MB/s and tokens/s.

    A plain line every PLAIN_EVERY_S (none at the end: the command's summary reports the whole run).
    """

    def __init__(self, renderer: Optional[Renderer] = None, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.r = renderer or Renderer()
        self.mark = (clock(), 0, 0)  # (time, bytes, tokens) at the last rate measurement

    def __call__(self, done: int, total: int, tokens: int) -> None:
        self.r.add("prepare", total, unit="bytes")
        if done >= total and not self.r.tty:
            return  # plain mode: the command's summary line reports the whole run
        now = self.clock()
        t0, bytes0, tokens0 = self.mark
        if now - t0 < (TTY_EVERY_S if self.r.tty else PLAIN_EVERY_S) and done < total:
            return
        dt = max(now - t0, 1e-9)
        rates = f"{(done - bytes0) / dt / 1e6:,.1f} MB/s · {(tokens - tokens0) / dt:,.0f} tokens/s"
        self.mark = (now, done, tokens)
        self.r.update("prepare", done, total, status=rates,
                      plain=f"prepare {100 * done / max(total, 1):5.1f}% · {done / 1e6:,.1f}/{total / 1e6:,.1f} MB · {rates}")

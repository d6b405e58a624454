"""The metrics component and the live report: what each record holds, and a report's cost per evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import CONFIGS
from gptcli import report
from gptcli.config import load_config
from gptcli.metrics import Metrics
from gptcli.train import train


def _synthetic_run(run_dir, n: int) -> None:
    """metrics.jsonl of a long run: a train record every step, an evaluation every 5."""
    lines = []
    for step in range(1, n + 1):
        lines.append({"event": "train", "step": step, "epoch": 1, "tokens_seen": 128 * step, "loss": 5.0, "lr": 4e-4})
        if step % 5 == 0:
            lines.append({"event": "eval", "step": step, "epoch": 1, "epoch_progress": step / n,
                          "tokens_seen": 128 * step, "train_loss": 5.0, "val_loss": 6.0, "lr": 4e-4})
    (run_dir / report.METRICS).write_text("".join(json.dumps(e) + "\n" for e in lines))


def _cost_of_evaluations(tmp_path, monkeypatch, n: int, evals: int = 20) -> dict[str, int]:
    """Metrics lines read, CSV rows written and plotted points while `evals` evaluations are reported at step n."""
    run = tmp_path / str(n)
    run.mkdir()
    _synthetic_run(run, n)
    plotted = []
    monkeypatch.setattr(report, "plot_losses", lambda events, path: plotted.append(len(events)))
    log, live = report.MetricsLog(run, resume_step=n), report.LiveReport(run)
    read, written = live.rows_read, live.rows_written
    for i in range(evals):
        record = {"event": "eval", "step": n + i + 1, "epoch": 1, "tokens_seen": 0, "train_loss": 5.0, "val_loss": 6.0}
        log.write(record)
        live.write(record)
    cost = {"rows_read": live.rows_read - read, "rows_written": live.rows_written - written, "points_plotted": sum(plotted)}
    log.close()
    live.close()  # the end of the run: the plot is drawn complete
    assert plotted[-1] == n // 5 + evals
    assert len((run / report.CSV).read_text().splitlines()) == 1 + n + n // 5 + evals
    return cost


def test_report_cost_per_evaluation_does_not_grow_with_the_run(tmp_path, monkeypatch):
    """issue 13: report.render re-read metrics.jsonl and redrew the plot at every evaluation (cost ~ N)."""
    short = _cost_of_evaluations(tmp_path, monkeypatch, 100)
    long = _cost_of_evaluations(tmp_path, monkeypatch, 10_000)
    assert short == long == {"rows_read": 0, "rows_written": 20, "points_plotted": 0}


def test_a_new_run_plots_its_first_evaluation_at_once(tmp_path):
    live = report.LiveReport(tmp_path)
    live.write({"event": "train", "step": 1, "loss": 5.0})
    assert not (tmp_path / report.PLOT).exists()
    live.write({"event": "eval", "step": 1, "epoch": 1, "train_loss": 5.0, "val_loss": 6.0})
    assert (tmp_path / report.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    live.close()


def test_metrics_hands_every_record_to_every_sink_the_caller_added():
    class Sink:
        def __init__(self):
            self.records, self.closed = [], False

        def write(self, record):
            self.records.append(record)

        def close(self):
            self.closed = True

    first, second = Sink(), Sink()
    metrics = Metrics([first], torch.device("cpu"), 1e6, 1, None, total_steps=10, step=0, tokens_seen=0, elapsed_s=0.0)
    metrics.sinks.append(second)
    metrics.train_record(1, 1, 128, 5.0, 4e-4, None)
    metrics.eval_record(step=1, train_loss=5.0, val_loss=6.0)
    metrics.close()
    assert first.records == second.records and [r["event"] for r in first.records] == ["train", "eval"]
    assert first.closed and second.closed


def test_train_records_report_peak_memory_data_wait_and_eta(verdict, tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.max_steps": 4, "train.max_new_tokens": 0})
    train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / report.METRICS).read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert len(steps) == 4
    for r in steps:
        assert r["peak_host_mb"] > 10  # a Python process with torch loaded holds far more than 10 MiB
        assert r["peak_device_mb"] is None  # a CPU run
        assert 0 <= r["data_wait_s"] < r["elapsed_s"]
        assert r["eta_s"] >= 0
    assert steps[0]["eta_s"] > 0 and steps[-1]["eta_s"] == 0  # the last step has nothing left
    assert all(math.isfinite(r["tokens_per_s"]) for r in steps)
    header = (tmp_path / "run" / report.CSV).read_text().splitlines()[0].split(",")
    assert {"peak_host_mb", "peak_device_mb", "data_wait_s", "eta_s"} <= set(header)


def _record(step: int) -> dict:
    return {"event": "eval", "step": step, "epoch": 1, "epoch_progress": step / 10, "tokens_seen": 128 * step,
            "train_loss": 5.0, "val_loss": 6.0}


def _live_run(run, steps):
    """A run's two metrics sinks, after `steps` records."""
    log, live = report.MetricsLog(run), report.LiveReport(run, plot_interval_s=3600)
    for step in steps:
        log.write(_record(step))
        live.write(_record(step))
    return log, live


def _csv_steps(run) -> list[int]:
    import csv

    return [int(row["step"]) for row in csv.DictReader((run / report.CSV).open())]


def test_plot_of_a_running_run_leaves_its_live_metrics_csv_whole(cli, tmp_path):
    """Audit f2 defect 2: `gptcli plot RUN` during training replaced metrics.csv (a new file) while the run
    kept appending to the old, unlinked one: the CSV lost every later row for good (31 records, 20 lines).
    The CSV of a run that holds its lock belongs to the run: plot redraws the PNG only and says so."""
    from gptcli.rundir import lock_run

    from gptcli.resolve import RUN_FORMAT

    run = tmp_path / "run"
    run.mkdir()
    lock = lock_run(run)
    (run / "run.json").write_text('{"format": "%s", "state": "running"}' % RUN_FORMAT)  # train writes it first
    log, live = _live_run(run, range(1, 4))
    result = cli("plot", run)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(run / report.PLOT)
    assert "metrics.csv" in result.stderr and "training" in result.stderr
    for step in range(4, 7):
        log.write(_record(step))
        live.write(_record(step))
    log.close()
    live.close()
    lock.close()
    assert _csv_steps(run) == list(range(1, 7))


def test_a_live_csv_replaced_behind_its_writer_is_rewritten_whole(tmp_path):
    """Audit f2 defect 2, the writer's side: whoever replaces metrics.csv during a run (an older gptcli's
    plot, a script), the run's next record rewrites it from metrics.jsonl, so no row is lost for good."""
    log, live = _live_run(tmp_path, range(1, 4))
    report.write_csv([_record(1)], tmp_path / report.CSV)  # a new file, as of an earlier moment
    for step in range(4, 6):
        log.write(_record(step))
        live.write(_record(step))
    assert _csv_steps(tmp_path) == list(range(1, 6))
    report.write_csv([], tmp_path / report.CSV)  # replaced once more, after the last record
    log.close()
    live.close()
    assert _csv_steps(tmp_path) == list(range(1, 6))

"""gptcli runs / compare / plot of several runs (issue 15 items 2 and 3).

A run's state comes from its own files and its lock: each state is produced here the way
it happens to users (a finished run, Ctrl-C, SIGKILL, a diverging run, a run in progress).
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from conftest import CONFIGS, gptcli_cmd
from gptcli.runs import PLOT_MARK, run_state

TINY = ["--config", str(CONFIGS / "tiny.yaml")]


def _train(cli, verdict, run, *extra):
    result = cli("train", *TINY, "--data", verdict, "--out", run, "--set", "train.max_new_tokens=0", *extra)
    return result


def _popen(verdict, run, env, *extra):
    return subprocess.Popen([*gptcli_cmd(), "train", *TINY, "--data", str(verdict), "--out", str(run),
                             "--num-epochs", "100", *extra], env=env, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, n: int) -> None:
    for line in proc.stderr:
        if line.startswith(f"step {n}/"):
            return
    raise AssertionError(f"the run ended before step {n} (exit {proc.wait()})")


def _runs_json(cli, root) -> dict:
    result = cli("runs", root, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_a_finished_run_is_finished_with_its_figures(cli, verdict, tmp_path):
    assert _train(cli, verdict, tmp_path / "runs" / "a", "--max-steps", "6").exit_code == 0
    (row,) = _runs_json(cli, tmp_path / "runs")["runs"]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "a" / "metrics.jsonl").read_text().splitlines()]
    vals = [m["val_loss"] for m in metrics if m["event"] == "eval"]
    assert row["name"] == "a" and row["state"] == "finished" and row["ended_at"]
    assert row["steps"] == 6 and row["tokens_seen"] == 6 * 4 * 32  # batch 4 windows of 32 tokens
    assert row["val_loss"] == vals[-1] and row["best_val_loss"] == min(vals)
    assert row["tokens_per_s"] > 0 and row["wall_s"] > 0


def test_ctrl_c_is_stopped_by_sigint_and_a_resume_that_finishes_is_finished(cli, verdict, tmp_path, subprocess_env):
    run = tmp_path / "run"
    proc = _popen(verdict, run, subprocess_env)
    _wait_for_step(proc, 3)
    proc.send_signal(signal.SIGINT)
    proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    state = run_state(run)
    assert state["state"] == "stopped" and state["signal"] == "SIGINT"
    steps = json.loads((run / "run.json").read_text())
    assert steps["state"] == "stopped"
    done = _train(cli, verdict, run, "--resume", "--max-steps", "12")
    assert done.exit_code == 0, done.stderr
    assert run_state(run) == {"state": "finished", "ended_at": run_state(run)["ended_at"]}  # no stale signal


def test_a_run_in_progress_is_running_and_a_killed_one_is_interrupted(cli, verdict, tmp_path, subprocess_env):
    run = tmp_path / "run"
    proc = _popen(verdict, run, subprocess_env)
    try:
        _wait_for_step(proc, 3)
        state = run_state(run)
        assert state == {"state": "running", "pid": proc.pid}
    finally:
        proc.kill()  # SIGKILL: the process cannot record how it ended
        proc.wait(timeout=60)
    assert _runs_json(cli, tmp_path)["runs"][0]["state"] == "interrupted"


def test_a_run_with_a_nonfinite_loss_is_failed_with_its_error(cli, verdict, tmp_path):
    run = tmp_path / "run"
    assert _train(cli, verdict, run, "--learning-rate", "1e30").exit_code == 1
    state = run_state(run)
    assert state["state"] == "failed" and "non-finite loss" in state["error"]


def test_runs_table_names_the_config_keys_in_which_runs_differ(cli, verdict, tmp_path):
    root = tmp_path / "checkpoints"
    for name, lr in (("a", "0.001"), ("b", "0.002")):
        assert _train(cli, verdict, root / name, "--max-steps", "2", "--learning-rate", lr).exit_code == 0
    (root / "notes").mkdir()  # a user's folder beside the runs is not a run
    result = _runs_json(cli, root)
    assert [r["name"] for r in result["runs"]] == ["a", "b"]
    assert result["differences"] == {"train.learning_rate": {"a": 0.001, "b": 0.002}}
    table = cli("runs", root)
    assert table.exit_code == 0 and "train.learning_rate" in table.stdout and "finished" in table.stdout


def test_compare_writes_one_plot_of_all_runs_and_never_overwrites_a_users_file(cli, verdict, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run, steps in zip(runs, ("2", "3")):
        assert _train(cli, verdict, run, "--max-steps", steps).exit_code == 0
    out = tmp_path / "cmp.png"
    result = cli("compare", *runs, "--x", "step", "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["steps"] for r in data["runs"]] == [2, 3] and data["plot"] == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and PLOT_MARK.encode() in out.read_bytes()[:4096]
    again = cli("compare", *runs, "--out", out)  # our own plot: redrawn
    assert again.exit_code == 0, again.stderr
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\nsomeone else's picture")
    refused = cli("compare", *runs, "--out", mine)
    assert refused.exit_code == 2 and "--out" in refused.stderr
    assert mine.read_bytes().endswith(b"someone else's picture")


def test_plot_of_several_runs_overlays_them_and_one_run_keeps_its_own_plot(cli, verdict, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert _train(cli, verdict, run, "--max-steps", "2").exit_code == 0
    (runs[0] / "losses.png").unlink()
    one = cli("plot", runs[0])
    assert one.exit_code == 0 and one.stdout.strip() == str(runs[0] / "losses.png")
    several = cli("plot", *runs, "--x", "time")
    assert several.exit_code == 0, several.stderr
    out = tmp_path / "compare-a-vs-b.png"
    assert several.stdout.strip() == str(out) and out.is_file() and str(out) in several.stderr


@pytest.mark.parametrize("args", [["compare", "nowhere", "also-nowhere"], ["runs", "nowhere"]])
def test_paths_that_are_not_runs_exit_2(cli, args):
    result = cli(*args)
    assert result.exit_code == 2 and "nowhere" in result.stderr


def _hand_made_run(run, events=({"event": "train", "step": 1, "epoch": 1, "tokens_seen": 8, "loss": 3.0},)):
    """A run as train leaves it, without training: gptcli's run.json (its format marker) and metrics.jsonl."""
    from gptcli.resolve import RUN_FORMAT

    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format": RUN_FORMAT, "state": "finished"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_runs_lists_only_folders_that_carry_gptcli_markers_not_files_merely_named_like_its_own(cli, tmp_path):
    root = tmp_path / "root"
    _hand_made_run(root / "a")
    (root / "notes").mkdir()
    (root / "notes" / "run.json").write_text('{"my": "data"}')  # a user's run.json
    (root / "other").mkdir()
    (root / "other" / "metrics.jsonl").write_text("another tool's log\n")
    assert [r["name"] for r in _runs_json(cli, root)["runs"]] == ["a"]
    refused = cli("compare", root / "notes", root / "a")
    assert refused.exit_code == 2 and "notes: not a gptcli run" in refused.stderr


def test_plot_never_overwrites_a_metrics_csv_or_losses_png_that_gptcli_did_not_write(cli, tmp_path):
    event = '{"event": "train", "step": 1, "epoch": 1, "tokens_seen": 8, "loss": 3.0}\n'
    foreign = tmp_path / "foreign"  # not a run: another tool's folder whose files merely carry our names
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text(event)
    (foreign / "metrics.csv").write_text("my,own,csv\n")
    (foreign / "losses.png").write_bytes(b"my picture")
    result = cli("plot", foreign)
    assert result.exit_code == 2 and "not a gptcli run" in result.stderr
    assert (foreign / "metrics.csv").read_text() == "my,own,csv\n" and (foreign / "losses.png").read_bytes() == b"my picture"
    run = _hand_made_run(tmp_path / "run")  # a run of ours holding a CSV of the user's
    (run / "metrics.csv").write_text("my,own,csv\n")
    result = cli("plot", run)
    assert result.exit_code == 2 and "metrics.csv: not a file gptcli wrote" in result.stderr
    assert (run / "metrics.csv").read_text() == "my,own,csv\n" and not (run / "losses.png").exists()
    (run / "metrics.csv").unlink()
    assert cli("plot", run).exit_code == 0 and (run / "metrics.csv").read_text().startswith("event,")


def test_a_damaged_metrics_line_is_skipped_by_runs_compare_plot_and_resume(cli, tmp_path):
    from gptcli.report import MetricsLog, read_metrics

    good = [{"event": "train", "step": s, "epoch": 1, "tokens_seen": 8 * s, "loss": 3.0 / s} for s in (1, 2)]
    runs = [_hand_made_run(tmp_path / name, good) for name in ("a", "b")]
    with open(runs[0] / "metrics.jsonl", "ab") as f:  # a block of garbage after a crash, and a line that is no object
        f.write(b'\xff\xfe{"event": "train", "step": 3\n[1, 2]\n')
    assert [r["steps"] for r in _runs_json(cli, tmp_path)["runs"]] == [2, 2]
    assert cli("compare", *runs, "--out", tmp_path / "cmp.png").exit_code == 0
    assert cli("plot", runs[0]).exit_code == 0
    MetricsLog(runs[0], resume_step=1).close()  # --resume from step 1 keeps the records up to it
    assert read_metrics(runs[0] / "metrics.jsonl") == good[:1]


def test_compare_from_inside_a_run_names_it_and_draws_beside_it_not_into_it(cli, tmp_path, monkeypatch):
    a, b = _hand_made_run(tmp_path / "a"), _hand_made_run(tmp_path / "b")
    monkeypatch.chdir(a)
    result = cli("compare", ".", "../b", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["runs"]] == ["a", "b"]
    assert data["plot"] == str(tmp_path / "compare-a-vs-b.png") and (tmp_path / "compare-a-vs-b.png").is_file()
    assert sorted(p.name for p in a.iterdir()) == ["metrics.jsonl", "run.json"]  # the run holds only its own files


def test_plot_json_names_the_files_it_drew(cli, tmp_path):
    a, b = _hand_made_run(tmp_path / "a"), _hand_made_run(tmp_path / "b")
    one = cli("plot", a, "--json")
    assert one.exit_code == 0, one.stderr
    assert json.loads(one.stdout) == {"plot": str(a / "losses.png"), "csv": str(a / "metrics.csv")}
    several = cli("plot", a, b, "--out", tmp_path / "both.png", "--json")
    assert several.exit_code == 0 and json.loads(several.stdout) == {"plot": str(tmp_path / "both.png")}


def test_runs_of_a_folder_without_runs_says_why_not_an_empty_table_alone(cli, verdict, tmp_path):
    (tmp_path / "empty").mkdir()
    empty = cli("runs", tmp_path / "empty")
    assert empty.exit_code == 0 and f"no gptcli runs in {tmp_path / 'empty'}" in empty.stderr
    assert _train(cli, verdict, tmp_path / "runs" / "a", "--max-steps", "2").exit_code == 0
    (step,) = (tmp_path / "runs" / "a").glob("step-*")
    inside = cli("runs", step)  # a checkpoint given instead of the folder of runs: the command that lists it
    assert inside.exit_code == 0 and f"gptcli runs {tmp_path / 'runs'}" in inside.stderr


def test_plot_and_compare_on_a_full_disk_are_one_line_and_keep_the_earlier_files(cli, tmp_path, monkeypatch):
    """A full disk (or a read-only run) made `plot` print 'internal error: OSError', and `compare`
    left its half-written temporary PNG behind."""
    import errno
    import os

    from gptcli import fsio

    a, b = _hand_made_run(tmp_path / "a"), _hand_made_run(tmp_path / "b")
    assert cli("plot", a).exit_code == 0
    before = {p.name: p.read_bytes() for p in a.iterdir()}

    def full(path, data):
        with open(path, "wb") as f:
            f.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsio, "write_synced", full)
    for args, where in (((a,), a), ((a, b, "--out", tmp_path / "both.png"), tmp_path),
                        (("compare", a, b, "--out", tmp_path / "cmp.png"), tmp_path)):
        result = cli(*(args if args[0] == "compare" else ("plot", *args)))
        assert result.exit_code == 1, result.stderr
        assert result.stderr.startswith("error: ") and "No space left on device" in result.stderr, result.stderr
        assert not [p.name for p in where.iterdir() if p.name.startswith(".")]
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
    assert not (tmp_path / "both.png").exists() and not (tmp_path / "cmp.png").exists()

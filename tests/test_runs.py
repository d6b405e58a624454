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

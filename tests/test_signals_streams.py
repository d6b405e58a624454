"""Signals and streams (issue 12 finding 6): a closed terminal, a pipe into `head`, a full disk.

Training never dies of its output: SIGHUP saves and stops like SIGTERM, a failing stderr goes
quiet while the run goes on, and a failing stdout at the end costs nothing that was saved.
Commands whose stdout is closed by its reader end quietly with 141; a full disk or a closed
descriptor ends with one line on stderr and exit 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CONFIGS, gptcli_cmd
from gptcli.checkpoint import find_latest, load_checkpoint
from gptcli.fsio import read_json_object
from gptcli.runs import run_state

TINY = ["--config", str(CONFIGS / "tiny.yaml")]
CLOSED_PIPE = 141  # 128 + SIGPIPE, the README's exit-code table


def _train_args(verdict, run, *extra) -> list[str]:
    return [*gptcli_cmd(), "train", *TINY, "--data", str(verdict), "--out", str(run), *extra]


def _assert_finished(run, steps: int) -> None:
    """The run's newest checkpoint verifies and holds the state to resume from at `steps`."""
    latest, skipped = find_latest(run)
    assert latest is not None and not skipped
    ckpt = load_checkpoint(latest, with_train_state=True)
    assert ckpt.train_state["step"] == steps


def _no_crash(stderr: str) -> None:
    for bad in ("Traceback", "internal error", "Exception ignored"):
        assert bad not in stderr, stderr


@pytest.mark.parametrize("name, code", [("SIGHUP", 129), ("SIGTERM", 143)])
def test_hangup_and_terminate_save_a_checkpoint_and_say_how_to_resume(verdict, tmp_path, subprocess_env, name, code):
    """issue 12 finding 6: closing the terminal (SIGHUP) exited 129 with no checkpoint; it now stops
    like SIGTERM: the step finishes, a checkpoint is saved, and the run resumes from it."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_args(verdict, run, "--num-epochs", "100"), env=subprocess_env,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("step 3/"):
            break
    proc.send_signal(getattr(signal, name))
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == code
    assert name in rest and "--resume" in rest
    latest, _ = find_latest(run)
    assert latest is not None and latest.name >= "step-000003"
    resumed = subprocess.run(_train_args(verdict, run, "--resume", "--max-steps", str(int(latest.name[5:]) + 1)),
                             env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr


def test_closing_the_terminal_saves_a_checkpoint_and_exits_129(verdict, tmp_path, subprocess_env):
    """issue 12 finding 6: a run on a terminal (progress bar) whose terminal goes away: every later
    write to it fails (EIO) and SIGHUP arrives; the run saves, stops with 129 and resumes."""
    pty = pytest.importorskip("pty")  # POSIX terminals
    run = tmp_path / "run"
    master, slave = pty.openpty()
    proc = subprocess.Popen(_train_args(verdict, run, "--num-epochs", "100", "--set", "train.save_freq=2"),
                            env=subprocess_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while b"saved" not in seen and b"Ep 1" not in seen:  # the bar is drawn and a step is done
        seen += os.read(master, 4096)
    os.close(master)  # the terminal is gone: writes to it now fail with EIO
    time.sleep(1)  # let the run meet failing writes (the bar refreshes 4 times a second) before the hangup
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=120) == 129
    latest, _ = find_latest(run)
    assert latest is not None
    resumed = subprocess.run(_train_args(verdict, run, "--resume", "--max-steps", str(int(latest.name[5:]) + 1)),
                             env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr


def test_training_piped_into_head_keeps_training_and_keeps_the_run(verdict, tmp_path, subprocess_env):
    """issue 12 finding 6: `gptcli train ... 2>&1 | head -1` died at the first write with no checkpoint.

    The reader takes one line and leaves: every later progress line fails (EPIPE) and is dropped,
    the run trains to its end and saves; only the final stdout line is lost (exit 141)."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_args(verdict, run, "--max-steps", "12"), env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=300) == CLOSED_PIPE
    assert first.startswith(b"training ")
    _assert_finished(run, 12)
    resumed = subprocess.run(_train_args(verdict, run, "--resume", "--max-steps", "14"), env=subprocess_env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_finished(run, 14)


def _train_redirected(verdict, run, redirect: str, env, **streams) -> subprocess.CompletedProcess:
    """A 3-step tiny run started by a shell with `redirect` applied (`2>&-`, `>/dev/full`, ...)."""
    if redirect.endswith("/dev/full") and not sys.platform.startswith("linux"):
        pytest.skip("/dev/full is Linux's")
    return subprocess.run(["bash", "-c", f'exec "$@" {redirect}', "bash", *_train_args(verdict, run, "--max-steps", "3")],
                          env=env, text=True, timeout=300, **streams)


@pytest.mark.parametrize("redirect", ["2>&-", "2>/dev/full"])
def test_a_closed_or_full_stderr_never_stops_training(verdict, tmp_path, subprocess_env, redirect):
    """issue 12 finding 6: progress that cannot be written is dropped; the run and its result are not."""
    done = _train_redirected(verdict, tmp_path / "run", redirect, subprocess_env, stdout=subprocess.PIPE)
    assert done.returncode == 0
    assert done.stdout.strip().endswith("step-000003")
    _assert_finished(tmp_path / "run", 3)


@pytest.mark.parametrize("redirect, reason", [(">&-", "Bad file descriptor"), (">/dev/full", "No space left on device")])
def test_training_whose_stdout_fails_at_the_end_keeps_the_run(verdict, tmp_path, subprocess_env, redirect, reason):
    """issue 12 finding 6: `>&-` and `> /dev/full` ended training in internal errors."""
    done = _train_redirected(verdict, tmp_path / "run", redirect, subprocess_env, stderr=subprocess.PIPE)
    assert done.returncode == 1
    _no_crash(done.stderr)
    assert done.stderr.splitlines()[-1] == f"error: cannot write to stdout: {reason}"
    _assert_finished(tmp_path / "run", 3)


# Each command's stdout output, on an untrained tiny model (no checkpoint in the working directory).
COMMANDS = {
    "generate --stream": ["generate", "Every effort moves you", *TINY, "--stream", "--max-new-tokens", "40"],
    "generate --json": ["generate", "Every effort moves you", *TINY, "--json"],
    "eval --show-tokens": ["eval", *TINY, "--text", "Every effort moves you", "--show-tokens"],
    "loss": ["loss", *TINY, "--eval-iter", "1"],
    "--help": ["--help"],  # click's own output goes through the same streams
}


def _command(name: str, verdict) -> list[str]:
    args = COMMANDS[name]
    return [*gptcli_cmd(), *args, *(["--data", str(verdict)] if name == "loss" else [])]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_output_into_a_closed_pipe_ends_quietly_with_141(verdict, tmp_path, subprocess_env, name):
    """issue 12 finding 6: `generate --stream | head -1` (and --json, eval --show-tokens, loss) ended
    in `internal error: BrokenPipeError`. The reader here leaves before the first byte, so every
    command meets the closed pipe whatever its output's size."""
    proc = subprocess.Popen(_command(name, verdict), env=subprocess_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == CLOSED_PIPE, stderr
    _no_crash(stderr)
    assert "error" not in stderr.replace("warning: no checkpoint found", "")


def test_generate_stream_into_head_ends_quietly(verdict, tmp_path, subprocess_env):
    """issue 12 finding 6: the shell's own pipe, a reader that leaves mid-stream (head -c: one line
    of streamed text only ends with the sample)."""
    cmd = " ".join(f"'{a}'" for a in _command("generate --stream", verdict)).replace("'40'", "'300'")
    done = subprocess.run(["bash", "-c", f"{cmd} | head -c 30 >/dev/null; exit ${{PIPESTATUS[0]}}"],
                          env=subprocess_env, cwd=tmp_path, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == CLOSED_PIPE, done.stderr
    _no_crash(done.stderr)


@pytest.mark.parametrize("redirect, reason", [(">&-", "Bad file descriptor"), (">/dev/full", "No space left on device")])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_full_or_closed_stdout_is_one_line_and_exit_1(verdict, tmp_path, subprocess_env, name, redirect, reason):
    """issue 12 finding 6: `>&-` and `> /dev/full` ended in internal errors."""
    if redirect.endswith("/dev/full") and not sys.platform.startswith("linux"):
        pytest.skip("/dev/full is Linux's")
    done = subprocess.run(["bash", "-c", f'exec "$@" {redirect}', "bash", *_command(name, verdict)],
                          env=subprocess_env, cwd=tmp_path, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    _no_crash(done.stderr)
    # Warnings and the note naming the model the command chose (issue 12 build 1) may come first.
    errors = [line for line in done.stderr.splitlines() if not line.startswith(("warning: ", "model: "))]
    assert errors == [f"error: cannot write to stdout: {reason}"]


# ---- signals at the edges of a run, injected at the exact moment (in-process, no timing)

QUICK = ["--set", "train.max_new_tokens=0", "--set", "train.peak_flops=1e12"]


def _train_in_process(cli, verdict, run, *extra):
    return cli("train", *TINY, "--data", verdict, "--out", run, *QUICK, *extra)


def _second_ctrl_c_inside_torch_save(monkeypatch, at_call: int) -> None:
    """Ctrl-C twice while the `at_call`-th train_state is written: the first sets the stop flag, the
    second lands in torch.save's write callback, where torch wraps the KeyboardInterrupt in a RuntimeError."""
    real_save, calls = torch.save, []

    class _Writer:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                signal.raise_signal(signal.SIGINT)  # the second Ctrl-C: StopSignals raises KeyboardInterrupt
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) != at_call:
            return real_save(obj, f, *args, **kwargs)
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C
        return real_save(obj, _Writer(f), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("at_call, newest", [(1, None), (2, "step-000002")])
def test_a_second_ctrl_c_inside_a_checkpoint_write_is_an_interruption(cli, verdict, tmp_path, monkeypatch,
                                                                       at_call, newest):
    """Audit f2 defect 1: a second Ctrl-C inside torch.save ended in `internal error: RuntimeError: [enforce
    fail at inline_container.cc:672] . unexpected pos`, exit 1, run.json "failed"; and a second Ctrl-C before
    any checkpoint recorded "stopped" (which promises a checkpoint to resume). Now: exit 130, "interrupted"
    (run.json says so, with the signal), no partial checkpoint left, the newest complete one intact."""
    run = tmp_path / "run"
    _second_ctrl_c_inside_torch_save(monkeypatch, at_call)
    result = _train_in_process(cli, verdict, run, "--max-steps", "6", "--set", "train.save_freq=2")
    assert result.exit_code == 130, result.stderr
    _no_crash(result.stderr)
    assert result.stderr.splitlines()[-1] == "interrupted"
    assert run_state(run) == {"state": "interrupted", "signal": "SIGINT", "ended_at": run_state(run)["ended_at"]}
    assert [p.name for p in run.iterdir() if p.name.startswith(".tmp-")] == []
    latest, skipped = find_latest(run)
    assert (latest.name if latest else None) == newest and not skipped


def _signal_inside(monkeypatch, owner, name: str, signum: int) -> None:
    """Send this process `signum` when `owner.name` is called (then run it)."""
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


@pytest.fixture
def sigterm_kills():
    """SIGTERM that reaches no handler of gptcli's ends the test with an error (in a real process it kills it, -15)."""
    def die(signum, frame):
        raise AssertionError("SIGTERM reached the default action: the process would have died (-15)")

    old = signal.signal(signal.SIGTERM, die)
    yield
    signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_final_checkpoint_leaves_the_run_finished(cli, verdict, tmp_path, monkeypatch,
                                                                     sigterm_kills, name):
    """Audit f2 defect 3: a signal during the final plot (after the last checkpoint) was not handled:
    SIGTERM killed the process silently (run.json "running", `gptcli runs` "interrupted"), SIGINT recorded
    "stopped" and its resume said "already finished". Now the teardown completes, the run is recorded
    finished, its result printed, and the exit code is the signal's (a shell's `&&` chain stops)."""
    from gptcli import report

    run = tmp_path / "run"
    _signal_inside(monkeypatch, report.LiveReport, "close", getattr(signal, name))
    result = _train_in_process(cli, verdict, run, "--max-steps", "3", "--json")
    code = 128 + getattr(signal, name)
    assert result.exit_code == code, result.stderr
    _no_crash(result.stderr)
    assert json.loads(result.stdout)["steps"] == 3
    assert "--resume" not in result.stderr and "finished" in result.stderr.splitlines()[-1]
    assert run_state(run)["state"] == "finished"
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + len((run / "metrics.jsonl").read_text().splitlines())
    _assert_finished(run, 3)


def test_a_signal_during_the_last_step_finishes_the_run(cli, verdict, tmp_path, monkeypatch):
    """Audit f2 defect 4: SIGTERM during the step that completes the run reported "stopped, continue with:
    gptcli train --out RUN --resume" (exit 143, no --json summary, run.json "stopped", checkpoint reason
    "interrupt"), and the resume then said the run already finished. Now that step ends the run: finished,
    reason "end", the summary printed, exit 143, and no hint to resume."""
    from gptcli import train as train_module

    run = tmp_path / "run"
    real = train_module.optimizer_step

    def step(run_, state, *args, **kwargs):
        if state.step + 1 == run_.total_steps:  # the last step: SIGTERM arrives while it computes
            signal.raise_signal(signal.SIGTERM)
        return real(run_, state, *args, **kwargs)

    monkeypatch.setattr(train_module, "optimizer_step", step)
    result = _train_in_process(cli, verdict, run, "--max-steps", "3", "--json")
    assert result.exit_code == 143, result.stderr
    _no_crash(result.stderr)
    assert json.loads(result.stdout)["checkpoint"] == str(run / "step-000003")
    assert "--resume" not in result.stderr and "finished" in result.stderr.splitlines()[-1]
    assert run_state(run)["state"] == "finished"
    assert read_json_object(run / "step-000003" / "manifest.json")["reason"] == "end"
    resumed = _train_in_process(cli, verdict, run, "--resume")
    assert resumed.exit_code == 0 and "already finished" in resumed.stderr

"""Portability (issue 12 "What to build" 7): no POSIX-only call without a fallback.

Windows and macOS are simulated here by taking away what they lack: symlinks that cannot be
created, no `fcntl`, no SIGHUP/SIGTERM; and an MPS device for the book-exact warning.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, ROOT
from gptcli.checkpoint import list_step_checkpoints, pointer_target
from gptcli.errors import RunError

TINY = ["--config", CONFIGS / "tiny.yaml"]


def test_training_and_ctrl_c_work_where_sighup_and_sigterm_do_not_exist(cli, verdict, tmp_path, monkeypatch):
    """issue 12 finding 6 / build 7: Windows has no SIGHUP; a missing signal is skipped, SIGINT still stops."""
    import gptcli.distributed  # noqa: F401  torch.distributed reads signal.SIGTERM on import: import it first
    from gptcli.rundir import StopSignals

    monkeypatch.delattr(signal, "SIGHUP")
    monkeypatch.delattr(signal, "SIGTERM")
    result = cli("train", *TINY, "--data", verdict, "--out", tmp_path / "run", "--max-steps", "2")
    assert result.exit_code == 0, result.stderr
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_run_lock_needs_no_fcntl(tmp_path, monkeypatch):
    """issue 12 build 7: the run lock went through fcntl (POSIX only); it now goes through filelock."""
    import filelock  # noqa: F401  imported without fcntl it would be a soft lock for the rest of the session
    from gptcli.rundir import lock_run as _lock

    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` now raises ImportError
    first = _lock(tmp_path)
    with pytest.raises(RunError, match=f"in use by gptcli train \\(pid {os.getpid()}\\)"):
        _lock(tmp_path)
    first.close()
    _lock(tmp_path).close()  # released: the next trainer takes it


def test_run_lock_is_released_when_its_holder_is_killed(tmp_path, subprocess_env):
    """issue 12 build 7: the lock names its holder's pid while it lives and frees itself on SIGKILL."""
    from gptcli.rundir import lock_run as _lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from gptcli.rundir import lock_run as _lock; "
         "held = _lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)", str(tmp_path)],
        env=subprocess_env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"pid {holder.pid}"):
            _lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    _lock(tmp_path).close()


@pytest.fixture
def no_symlinks(monkeypatch):
    """Symlinks cannot be created (Windows without the privilege, FAT, some network shares)."""

    def refuse(*args, **kwargs):
        raise OSError(1, "symbolic links are not supported here")

    monkeypatch.setattr(os, "symlink", refuse)
    monkeypatch.setattr(Path, "symlink_to", refuse)


def test_latest_and_best_work_where_symlinks_cannot_be_made(cli, verdict, tmp_path, no_symlinks):
    """issue 12 build 7: `latest`/`best` were symlinks only; now a pointer file where symlinks fail,
    followed by training, resume, eval of RUN/latest and RUN/best, and pruning."""
    run = tmp_path / "run"
    common = [*TINY, "--data", verdict, "--out", run, "--set", "train.save_freq=2", "--set", "train.keep_last=2"]
    result = cli("train", *common, "--max-steps", "8")
    assert result.exit_code == 0, result.stderr
    for name in ("latest", "best"):
        assert (run / name).is_file() and not (run / name).is_symlink()
    assert pointer_target(run / "latest") == run / "step-000008"
    best = pointer_target(run / "best")
    steps = [p.name for p in list_step_checkpoints(run)]
    assert steps[-2:] == ["step-000006", "step-000008"] and best.name in steps  # pruned, best kept
    assert len(steps) <= 3  # keep_last 2, plus best when it is older
    for name in ("latest", "best"):
        evaluated = cli("eval", "--checkpoint", run / name, "--json")
        assert evaluated.exit_code == 0, evaluated.stderr
        assert str(pointer_target(run / name)) in evaluated.stdout
    resumed = cli("train", *common, "--resume", "--max-steps", "10")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert pointer_target(run / "latest") == run / "step-000010"


@pytest.mark.parametrize("kind", ["pointer file", "symlink"])
def test_a_pointer_to_a_missing_step_is_a_clear_error(cli, tmp_path, kind):
    """issue 12 build 7: a pointer file whose step was deleted names what it points to; a dangling
    symlink said only 'no such checkpoint or run directory' (the two kinds are followed the same way)."""
    run = tmp_path / "run"
    run.mkdir()
    if kind == "symlink":
        (run / "latest").symlink_to("step-000042")
    else:
        (run / "latest").write_text("step-000042\n")
    result = cli("eval", "--checkpoint", run / "latest")
    assert result.exit_code == 1
    assert "points to step-000042, which does not exist" in result.stderr


def test_book_exact_config_warns_once_on_mps(cli, verdict, tmp_path, monkeypatch):
    """issue 12 build 7: on MPS the book-exact config (model.impl book) says its numbers will not match
    the book's. The device resolution reports mps; the run itself stays on the CPU."""
    from gptcli import train as train_mod
    from gptcli.train import book_exact_warning

    assert book_exact_warning("book", torch.device("mps")) is not None
    assert book_exact_warning("fused", torch.device("mps")) is None
    assert book_exact_warning("book", torch.device("cpu")) is None
    monkeypatch.setattr(train_mod, "resolve_device", lambda name: torch.device("mps"))
    monkeypatch.setattr(train_mod, "process_device", lambda device, info: torch.device("cpu"))
    for impl, count in (("book", 1), ("fused", 0)):
        result = cli("train", *TINY, "--data", verdict, "--out", tmp_path / impl, "--max-steps", "1",
                     "--set", f"model.impl={impl}")
        assert result.exit_code == 0, result.stderr
        assert result.stderr.count("will not match the book's") == count


def test_a_readers_lock_probe_does_not_make_train_refuse_the_run(tmp_path):
    """`gptcli runs` and `plot` take RUN/.lock for an instant to see whether the run trains; a trainer
    starting in that instant refused the run, naming the pid of the previous (finished) trainer."""
    import threading

    import filelock

    from gptcli.rundir import lock_run as _lock

    (tmp_path / ".lock.pid").write_text("999999")  # the last trainer's, long gone
    probe = filelock.FileLock(str(tmp_path / ".lock"), thread_local=False)
    probe.acquire(timeout=0)
    threading.Timer(0.2, probe.release).start()  # what runs.lock_held holds, stretched to be caught
    held = _lock(tmp_path)
    assert (tmp_path / ".lock.pid").read_text() == str(os.getpid())
    held.close()

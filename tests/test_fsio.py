"""Durable writes (gptcli.fsio): a failed write never damages what was there, nor leaves litter."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from gptcli import fsio


def test_atomic_write_replaces_the_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "index.json"
    target.write_text("old", encoding="utf-8")
    fsio.atomic_write(target, "new ü")
    assert target.read_text(encoding="utf-8") == "new ü"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_a_write_that_fills_the_disk_keeps_the_old_file_and_no_temporary(tmp_path):
    """A real write failure, not a mock: the file-size limit makes write(2) fail with EFBIG,
    as a full disk makes it fail with ENOSPC. Run in a child so the limit binds nothing else."""
    target = tmp_path / "metrics.csv"
    target.write_bytes(b"previous content")
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from gptcli.fsio import atomic_write\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        "    atomic_write(Path(sys.argv[1]), b'x' * 1_000_000)\n"
        "except OSError as e:\n"
        "    print(e.errno)\n"
        "    sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, env=env)
    assert done.returncode == 3, done.stderr
    assert int(done.stdout) == errno.EFBIG
    assert target.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_a_failing_fsync_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """EIO at fsync (a dying disk, a full thin-provisioned volume): the rename never happens."""
    target = tmp_path / "best"
    target.write_text("step-000002\n", encoding="utf-8")

    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        fsio.atomic_write(target, "step-000004\n")
    assert target.read_text(encoding="utf-8") == "step-000002\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_temporaries_carry_the_prefix_run_directories_recognise_as_ours(tmp_path):
    from gptcli.checkpoint import TEMPORARY, clean_temporaries

    leftover = fsio.temp_path(tmp_path / "metrics.csv")
    leftover.write_text("half", encoding="utf-8")
    assert TEMPORARY.match(leftover.name)  # the pattern run directories recognise as gptcli's own
    clean_temporaries(tmp_path)
    assert not leftover.exists()


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    data = os.urandom(3 * fsio.CHUNK + 17)  # several chunks and a partial one
    (tmp_path / "f").write_bytes(data)
    assert fsio.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()

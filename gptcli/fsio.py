"""Durable file writes, the one implementation every module uses.

A write that must survive a crash goes to a hidden temporary file beside its
destination (``.tmp-NAME-PID``, the prefix `checkpoint.clean_temporaries` and the
run-directory checks recognise as ours), is flushed and fsynced, renamed over the
destination in one atomic step, and the directory is fsynced so the rename itself is
durable. A write that fails leaves the previous file untouched and no temporary
behind. The standard library only; nothing of gptcli is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO

CHUNK = 1 << 20
TEMP_PREFIX = ".tmp-"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sync(f: IO) -> None:
    """Flush an open file's buffers and fsync it, so what was written survives a power cut."""
    f.flush()
    os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    """fsync a file that was written and closed elsewhere (e.g. by safetensors or torch.save)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` (created or truncated) and fsync it; no rename.

    For files inside a directory that is itself renamed into place afterwards.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with open(path, "wb") as f:
        f.write(raw)
        sync(f)


def temp_path(path: Path) -> Path:
    """The hidden temporary name `atomic_write` uses for `path` (same directory, same filesystem)."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str is written as UTF-8) atomically and durably.

    Raises:
        OSError: the write, fsync or rename failed (ENOSPC, EIO, EROFS ...); `path` keeps
            its previous content and no temporary file is left behind.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_json_object(path: Path) -> dict:
    """The JSON object in `path` (a run's own state files), or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

"""Checkpoints that describe themselves, verify themselves and survive a crash mid-write.

Layout of a run directory::

    RUN/step-000050/model.safetensors   weights of the unwrapped model (no pickle)
    RUN/step-000050/train_state.pt      optimizer, step, epoch, tokens, RNG and data position
    RUN/step-000050/config.yaml         the resolved config
    RUN/step-000050/manifest.json       sha256 and size of each file above, written last
    RUN/latest, RUN/best                symlinks to step directories (or, where symlinks
                                        cannot be made, text files holding the step's name);
                                        RUN/best may also be its own weights-only checkpoint
                                        directory when no step checkpoint was saved at that evaluation

A checkpoint is written into a hidden temporary directory (each file fsynced,
the manifest last), then renamed into place in one atomic step, so a crash at
any moment leaves either the old set of checkpoints or the new one. A directory
whose manifest is missing or does not match its files is never loaded.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptcli.config import Config, ConfigError, config_from_dict, save_config
from gptcli.device import resolve_device
from gptcli.errors import InputError, RunError, first_line
from gptcli.fsio import fsync_dir, fsync_file, sha256_file, write_synced
from gptcli.loading import torch_load
from gptcli.model import GPTModel, load_state_dict

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
CONFIG = "config.yaml"
FORMAT = "gptcli-checkpoint"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
CHECKPOINT_FILES = (WEIGHTS, TRAIN_STATE, CONFIG, MANIFEST)  # every file a checkpoint directory may hold
# What an interrupted write leaves: .tmp-NAME-PID (fsio.temp_path, a checkpoint being written), .old-NAME-PID.
TEMPORARY = re.compile(r"^\.(tmp|old)-.+-\d+$")
POINTER_MAX_BYTES = 64  # a pointer file holds one step directory name
PRUNED_RETRIES = 3  # how often a reader chooses again when training prunes the checkpoint it chose


def named_dir(root: Path, name: str, what: str) -> Path:
    """`root/name` for a run or model name given on the command line, refusing names that
    would lead outside `root` (``..``, absolute paths, path separators).

    Raises:
        InputError: the name is empty, hidden, or not a single path component.
    """
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise InputError(f"{what} {name!r}: must be a plain name (no '/', no '..', not hidden)", param=what)
    return root / name


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class Checkpoint:
    """A verified checkpoint, loaded into memory."""

    path: Path
    config: Config
    weights: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    train_state: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)  # newer checkpoints passed over, with reasons


def save_checkpoint(
    run_dir: Path,
    name: str,
    weights: dict[str, torch.Tensor],
    config: Config,
    train_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory `run_dir/name` atomically; return its path.

    Args:
        run_dir: the parent directory (created if missing).
        name: the checkpoint's directory name, e.g. ``step-000050``; "." writes the
            files into `run_dir` itself (for imported models).
        weights: tensors to store in model.safetensors.
        config: written as config.yaml.
        train_state: optimizer/RNG/position state for resuming, or None.
        meta: extra JSON-serialisable facts recorded in the manifest (step, losses, ...).

    Raises:
        RunError: the disk is full or not writable; nothing half-written is left behind
            and an existing checkpoint of the same name is untouched.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir if name == "." else run_dir / name
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_weights_file(tensors, tmp / WEIGHTS)
        save_config(config, tmp / CONFIG)
        if train_state is not None:
            _torch_save(train_state, tmp / TRAIN_STATE)
        files = {}
        for f in sorted(tmp.iterdir()):
            fsync_file(f)
            files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {
            "format": FORMAT,
            "version": 1,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": files,
            **(meta or {}),
        }
        write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        fsync_dir(tmp)
        if name == ".":
            for f in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST):  # manifest last
                os.replace(f, final / f.name)
            tmp.rmdir()
        else:
            if final.exists() or final.is_symlink():  # a symlink: RUN/best pointed at a step checkpoint
                old = run_dir / f".old-{final.name}-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                old.unlink() if old.is_symlink() else shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        fsync_dir(run_dir)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or first_line(e)
        raise RunError(f"{final}: cannot write checkpoint ({reason}); earlier checkpoints are intact") from None
    except BaseException:  # a second Ctrl-C: stop at once, leaving no half-written checkpoint
        shutil.rmtree(tmp, ignore_errors=True)  # (one more Ctrl-C here leaves it for the next start to clean)
        raise
    return final


def save_weights_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` as safetensors, readable like every other file gptcli writes.

    safetensors creates its file mode 0600; here it gets the mode ``open()`` gives a
    new file (0666 less the umask, so 0644 under the usual umask 022).
    """
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save, but a failing write (ENOSPC, EIO) surfaces as the OSError it is, and a Ctrl-C
    during it as the KeyboardInterrupt it is.

    torch reports an exception raised by the file object's write (an OSError, or the
    KeyboardInterrupt a second Ctrl-C raises there) as a RuntimeError ("unexpected pos ...")
    whose context holds it.
    """
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        if isinstance(e.__context__, (OSError, KeyboardInterrupt)):
            raise e.__context__ from None
        raise


def verify_checkpoint(path: Path, check_hashes: bool = True) -> dict[str, Any]:
    """The manifest of checkpoint directory `path`, after checking every file it lists.

    Raises:
        RunError: the directory, its manifest or a listed file is missing or does not match.
    """
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise RunError(f"{path}: not a checkpoint directory")
    if not manifest_path.is_file():
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise RunError(f"{path}: no {MANIFEST} (an incomplete or foreign checkpoint; found {present})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise RunError(f"{manifest_path}: unreadable manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise RunError(f"{manifest_path}: not a gptcli checkpoint manifest")
    missing = [name for name in manifest["files"] if not (path / name).is_file()]
    if missing:
        raise RunError(f"{path}: missing {', '.join(missing)}")
    for name, info in manifest["files"].items():
        f = path / name
        try:
            size = f.stat().st_size
            if size != info.get("bytes"):
                raise RunError(f"{f}: size {size} bytes, the manifest says {info.get('bytes')} (truncated?)")
            if check_hashes and sha256_file(f) != info.get("sha256"):
                raise RunError(f"{f}: sha256 does not match the manifest (corrupted)")
        except OSError as e:  # removed while read (the run's trainer pruned it), unreadable
            raise RunError(f"{f}: cannot read ({e.strerror})") from None
    if WEIGHTS not in manifest["files"] or CONFIG not in manifest["files"]:
        raise RunError(f"{path}: the manifest lists no {WEIGHTS} or {CONFIG}")
    return manifest


def list_step_checkpoints(run_dir: Path) -> list[Path]:
    """Step directories of a run, oldest first (whether complete or not)."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest(run_dir: Path, check_hashes: bool = True) -> tuple[Path | None, list[str]]:
    """The newest step checkpoint of `run_dir` that verifies, and why newer ones were skipped.

    A checkpoint that disappears while it is verified was pruned by the run's trainer, which
    has saved a newer one: it is no damage, and the run's checkpoints are listed again.
    """
    for _ in range(PRUNED_RETRIES):
        skipped, pruned = [], False
        for path in reversed(list_step_checkpoints(run_dir)):
            try:
                verify_checkpoint(path, check_hashes)
                return path, skipped
            except RunError as e:
                if path.exists():
                    skipped.append(str(e))
                else:
                    pruned = True
        if not pruned:
            break
    return None, skipped


def is_checkpoint_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def find_newest_anywhere(root: Path) -> tuple[Path | None, list[str]]:
    """The most recently written complete checkpoint below `root` (runs and imported models), and why
    newer ones were skipped."""
    if not root.is_dir():
        return None, []
    candidates = []
    for manifest in root.glob("**/" + MANIFEST):
        parent = manifest.parent
        if any(part.startswith(".") for part in parent.relative_to(root).parts):
            continue  # temporary directories of a write in progress
        candidates.append((manifest.stat().st_mtime, parent))
    skipped = []
    for _, path in sorted(candidates, reverse=True):
        try:
            verify_checkpoint(path, check_hashes=False)
            return path, skipped
        except RunError as e:
            skipped.append(str(e))
    return None, skipped


def resolve_checkpoint(path: Path, check_hashes: bool = True) -> tuple[Path, list[str]]:
    """A checkpoint directory for `path`: the directory itself, or a run's newest valid step.

    Raises:
        RunError: `path` does not exist or holds no valid checkpoint.
    """
    if not path.exists():
        if path.is_symlink():  # RUN/latest or RUN/best whose step was deleted: said as for a pointer file
            raise RunError(f"{path}: points to {os.readlink(path)}, which does not exist")
        raise RunError(f"{path}: no such checkpoint or run directory")
    if path.is_symlink():
        path = path.resolve()
    elif (target := pointer_target(path)) is not None:  # RUN/latest or RUN/best as a pointer file
        if not target.is_dir():
            raise RunError(f"{path}: points to {target.name}, which does not exist")
        path = target
    if is_checkpoint_dir(path) or (path / WEIGHTS).exists() or (path / CONFIG).exists():
        verify_checkpoint(path, check_hashes)  # a checkpoint's files without a valid manifest: say so
        return path, []
    if path.is_dir():
        latest, skipped = find_latest(path, check_hashes)
        if latest is not None:
            return latest, skipped
        reason = f" ({skipped[0]})" if skipped else ""
        raise RunError(f"{path}: no complete checkpoint found{reason}")
    raise RunError(f"{path}: not a checkpoint directory (expected a folder with {MANIFEST})")


def load_checkpoint(path: Path, device: str | torch.device = "cpu", with_train_state: bool = False) -> Checkpoint:
    """Verify and load a checkpoint (or a run's newest valid one).

    Weights come from safetensors; the training state is read with
    ``torch.load(weights_only=True)``, which refuses anything that would run code.

    Raises:
        RunError: missing, incomplete, corrupted or unreadable checkpoint.
    """
    for attempt in range(PRUNED_RETRIES):
        ckpt_dir, skipped = resolve_checkpoint(path)
        try:
            return _load_checkpoint_dir(ckpt_dir, skipped, device, with_train_state)
        except RunError:
            if ckpt_dir.exists() or attempt == PRUNED_RETRIES - 1:
                raise
            # pruned by the run's trainer while it was read: the run's newest is chosen again


def _load_checkpoint_dir(ckpt_dir: Path, skipped: list[str], device, with_train_state: bool) -> Checkpoint:
    manifest = verify_checkpoint(ckpt_dir, check_hashes=False)  # hashes checked by resolve
    try:
        raw = yaml.safe_load((ckpt_dir / CONFIG).read_text(encoding="utf-8"))
        config = config_from_dict(raw or {}, str(ckpt_dir / CONFIG))
    except (OSError, yaml.YAMLError, ConfigError, AttributeError) as e:
        # our own ConfigError is one line, however long (the list of valid keys); YAML's may be several
        raise RunError(f"{ckpt_dir / CONFIG}: invalid checkpoint config "
                       f"({first_line(e, limit=None) if isinstance(e, ConfigError) else first_line(e)})") from None
    try:
        weights = load_file(str(ckpt_dir / WEIGHTS), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # RuntimeError: torch's "unable to open file"
        raise RunError(f"{ckpt_dir / WEIGHTS}: cannot read weights ({e})") from None
    train_state = None
    if with_train_state:
        train_state = load_train_state(ckpt_dir / TRAIN_STATE)
    return Checkpoint(ckpt_dir, config, weights, manifest, train_state, skipped)


def model_from_checkpoint(ckpt: Checkpoint, device: str | torch.device | None = None) -> GPTModel:
    """A GPTModel in eval mode holding a loaded checkpoint's weights, on `device` (default: the config's).

    Raises:
        RunError: the weights do not fit the checkpoint's own config.
        InputError: the device is not available.
    """
    dev = resolve_device(device or ckpt.config.train.device)
    model = GPTModel(ckpt.config.model)
    try:
        load_state_dict(model, ckpt.weights)
    except ValueError as e:
        raise RunError(f"{ckpt.path}: the weights do not fit the checkpoint's config.yaml ({e})") from None
    return model.to(dev).eval()


def load_train_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RunError(f"{path}: missing (this checkpoint holds weights only and cannot resume training)")
    return torch_load(path, "training state")


def point(run_dir: Path, name: str, target: Path) -> None:
    """Atomically make `run_dir/name` point to `target` (a directory inside `run_dir`).

    A relative symlink where the filesystem allows one; otherwise (Windows without the
    symlink privilege, some network and FAT filesystems) a small text file holding the
    target's name, which `pointer_target` and every reader of `latest`/`best` follow.

    A weights-only checkpoint directory of that name (RUN/best, saved at an evaluation) is
    replaced: moved to a hidden name first, so `clean_temporaries` removes what a crash leaves.
    """
    link = run_dir / name
    tmp = run_dir / f".tmp-link-{name}-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        os.symlink(target.name, tmp)
    except (OSError, NotImplementedError):
        write_synced(tmp, target.name + "\n")
    old = None
    if link.is_dir() and not link.is_symlink():
        old = run_dir / f".old-{name}-{os.getpid()}"
        os.replace(link, old)
    os.replace(tmp, link)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(run_dir)


def pointer_target(path: Path) -> Path | None:
    """Where `path` points when it is a `point` pointer (symlink or pointer file), else None."""
    if path.is_symlink():
        return path.parent / os.readlink(path)
    if path.is_file() and path.stat().st_size <= POINTER_MAX_BYTES:
        try:
            name = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if STEP_DIR.match(name):
            return path.parent / name
    return None


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints, never those `latest`/`best` point to."""
    keep = set()
    for pointer in ("latest", "best"):
        target = pointer_target(run_dir / pointer)
        if target is not None:
            keep.add(target.name)
    removed = []
    for path in list_step_checkpoints(run_dir)[:-keep_last]:
        if path.name not in keep:
            remove_dir(path)
            removed.append(path)
    return removed


def remove_dir(path: Path) -> None:
    """Delete a directory so that no partly deleted copy is ever visible under its name.

    It is renamed to a hidden name first (atomic), then removed; a crash in between
    leaves only a hidden leftover that `clean_temporaries` removes.
    """
    hidden = path.parent / f".old-{path.name}-{os.getpid()}"
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def clean_temporaries(run_dir: Path) -> None:
    """Remove what interrupted writes left behind (hidden .tmp-/.old- entries)."""
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if TEMPORARY.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


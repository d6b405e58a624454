"""Which config, model, run directory and data a command uses: decided here, once, for every command.

What the user gave (a config file, ``--set``, dedicated flags, a checkpoint, a run
directory, ``--resume``/``--overwrite``/``--init-from``) becomes one ``Plan``: the
resolved config, the checkpoint the model comes from, the run directory, the mode,
and one-line notes for every choice the tool made by itself (the CLI prints them on
stderr). Precedence, lowest first, is ``PRECEDENCE``; what may change when a run is
resumed is ``RESUMABLE``. Both are documented in the README, and a test reads them there.

Library code: errors name config keys and parameters (the CLI maps them to its flags);
nothing here prints or exits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gptcli.checkpoint import (CHECKPOINT_FILES, CONFIG, FORMAT, MANIFEST, STEP_DIR, TEMPORARY, Checkpoint,
                               find_latest, find_newest_anywhere, list_step_checkpoints, load_checkpoint, named_dir,
                               pointer_target, remove_dir)
from gptcli.config import (Config, ConfigError, DataConfig, Layer, build_config, config_from_dict, config_layers,
                           load_config, map_paths)
from gptcli.data import DEFAULT_CORPUS, not_found
from gptcli.errors import InputError, RunError
from gptcli.fsio import read_json_object
from gptcli.loggers import STATE_FILE as LOGGERS_FILE, read_state as read_loggers_state
from gptcli.shards import find_sources, is_prepared, skipped_note

CHECKPOINTS_ROOT = Path("checkpoints")

# Where a config value comes from, highest precedence first (README: "Precedence").
PRECEDENCE = (
    ("flag", "a dedicated flag: --device, --data, --batch-size, --max-steps, --seed, ..."),
    ("--set", "--set section.key=value, later ones win"),
    ("--config", "the YAML file; relative paths in it are relative to the file's folder"),
    ("checkpoint", "the checkpoint's saved config (eval, loss, generate with a checkpoint; --resume)"),
    ("default", "the dataclass defaults in gptcli/config.py (the book's 124M run)"),
)

# The keys a resumed run may change (README: "What may change on resume"); any other key that
# differs from the run's saved config is refused by name. train.batch_size may change only with the
# process count, keeping the global batch (train checks it: the epoch's position counts those batches).
RESUMABLE = (
    "train.batch_size", "train.max_steps", "train.num_epochs", "train.max_tokens", "train.eval_freq", "train.eval_iter",
    "train.save_freq", "train.keep_last", "train.log_freq", "train.max_new_tokens", "train.start_context",
    "train.device", "train.num_threads", "train.host_memory", "train.peak_flops", "train.out_dir", "data.path",
    "train.distributed",  # checkpoints hold full weights: a DDP run resumes sharded (FSDP) and back
    "train.loggers", "train.logger_timeout",  # trackers only watch the run
    "train.optimizer_in_backward",  # the same updates, only when gradients are freed
)

# Model keys that may differ from a checkpoint's when evaluating it: the same weights, the same math.
EVAL_FREE_MODEL_KEYS = ("impl", "drop_rate", "init")

# What a gptcli run directory holds (anything else is the user's, and never deleted). A folder is a gptcli
# run only when it holds one of gptcli's own markers, recognised by content, not by name: run.json carrying
# RUN_FORMAT, or a checkpoint directory whose manifest carries checkpoint.FORMAT. Only then are the files
# recognised by name and shape alone (metrics, plot, temporaries) taken as the run's.
LOCK_FILES = (".lock", ".lock.pid")  # the run lock and its holder's pid (kept by --overwrite)
RUN_JSON = "run.json"
RUN_FORMAT = "gptcli-run"  # run.json's "format": what marks a folder as a gptcli run
RUN_FILES = (RUN_JSON, "metrics.jsonl", "metrics.csv", "losses.png", LOGGERS_FILE, *LOCK_FILES)
RUN_LINKS = ("latest", "best")
# How each file gptcli writes into a run begins (b"": an empty file, as a crash may leave one).
_OWN_HEADS = {"metrics.jsonl": (b'{"event"',), "metrics.csv": (b"event,",), "losses.png": (b"\x89PNG\r\n\x1a\n",)}
# The legacy run.json (before RUN_FORMAT): these keys, all written by train at the run's start.
_LEGACY_RUN_KEYS = ("started", "command", "config_source", "corpus", "resumes")


@dataclass
class Plan:
    """What a command will use, and the notes on what the tool chose by itself."""

    cfg: Config
    mode: str  # "new", "resume", "overwrite", "restart" (our own run without a checkpoint), "model"
    checkpoint: Optional[Path] = None  # the checkpoint the model (or the resumed run) comes from
    ckpt: Optional[Checkpoint] = None  # loaded (eval/loss/generate)
    run_dir: Optional[Path] = None
    init_from: Optional[Path] = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.notes = [f"warning: {w}" for w in self.cfg.warnings] + self.notes  # deprecated config keys


# ---------------------------------------------------------------- run directories


def foreign_entries(run_dir: Path) -> list[str]:
    """Names in `run_dir` that gptcli did not write (empty: the folder is a gptcli run or empty).

    Without one of gptcli's markers (a run.json of ours, a checkpoint directory whose manifest
    verifies as ours) nothing in the folder is taken as gptcli's, whatever its name.
    """
    if not run_dir.is_dir():
        return []
    marked = is_run_dir(run_dir)
    return sorted(p.name for p in run_dir.iterdir() if not _is_ours(p, marked))


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a gptcli run: a folder holding one of gptcli's markers (a run.json of ours, a
    checkpoint directory whose manifest verifies as ours), whatever else it holds or its files are named."""
    return path.is_dir() and any(_is_marker(p) for p in path.iterdir())


def is_run_manifest(path: Path) -> bool:
    """Whether `path` is a run.json that gptcli wrote (its format marker, or the keys train always wrote)."""
    data = read_json_object(path) if path.is_file() and not path.is_symlink() else {}
    return data.get("format") == RUN_FORMAT or (
        "format" not in data and all(k in data for k in _LEGACY_RUN_KEYS) and isinstance(data["corpus"], dict))


def _is_marker(p: Path) -> bool:
    """Whether `p` alone shows the folder is a gptcli run: our run.json, or a checkpoint of ours that verifies."""
    if p.name == RUN_JSON:
        return is_run_manifest(p)
    if (p.name == "best" or STEP_DIR.match(p.name)) and p.is_dir() and not p.is_symlink():
        return _checkpoint_kind(p) == "verified"
    return False


def _is_ours(p: Path, marked: bool) -> bool:
    """Whether gptcli wrote `p`, in a folder that holds (`marked`) or lacks one of its markers."""
    name = p.name
    if name == RUN_JSON or STEP_DIR.match(name):
        return _is_marker(p) or (marked and p.is_dir() and not p.is_symlink() and _checkpoint_kind(p) == "damaged")
    if name in RUN_LINKS:  # a pointer to a step directory, or (best) a weights-only checkpoint of its own
        if p.is_dir() and not p.is_symlink():
            return _is_marker(p) or (marked and _checkpoint_kind(p) == "damaged")
        target = pointer_target(p)
        return target is not None and target.parent == p.parent and STEP_DIR.match(target.name) is not None
    if name == LOCK_FILES[0]:  # filelock creates it and writes nothing
        return p.is_file() and not p.is_symlink() and p.stat().st_size == 0
    if name == LOCK_FILES[1]:  # our pid
        return _plain_file(p) and _head(p, 32).strip().isdigit()
    if not marked:
        return False
    if TEMPORARY.match(name):  # what an interrupted write left: .tmp-NAME-PID, .old-NAME-PID
        return True
    if name in _OWN_HEADS:
        return _plain_file(p) and (p.stat().st_size == 0 or _head(p, 16).startswith(_OWN_HEADS[name]))
    if name == LOGGERS_FILE:
        return _plain_file(p) and bool(read_loggers_state(p.parent))
    if p.is_dir() and not p.is_symlink() and any(  # a tracker's folder (tensorboard/, wandb/, mlflow/)
            isinstance(v, dict) and v.get("dir") == name for v in read_loggers_state(p.parent).values()):
        return True
    return False


def _plain_file(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _head(p: Path, n: int) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _checkpoint_kind(d: Path) -> Optional[str]:
    """"verified": a checkpoint directory of ours (our manifest, and only the files it lists); "damaged": one
    whose manifest is missing or unreadable but that holds nothing but the files a checkpoint holds; else None."""
    import json

    entries = list(d.iterdir())
    if not entries or not all(_plain_file(p) for p in entries):
        return None
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") == FORMAT and isinstance(manifest["files"], dict):
            return "verified" if all(p.name in set(manifest["files"]) | {MANIFEST} for p in entries) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return "damaged" if all(p.name in CHECKPOINT_FILES for p in entries) else None


def clear_run(run_dir: Path) -> list[str]:
    """Delete a gptcli run's own files (not its lock); return the names removed.

    Raises:
        InputError: `run_dir` holds anything gptcli did not write; nothing is deleted then.
    """
    refuse_foreign(run_dir)
    removed = []
    for p in sorted(run_dir.iterdir()):
        if p.name in LOCK_FILES:
            continue
        if p.is_dir() and not p.is_symlink():
            remove_dir(p)  # renamed away first: no half-deleted checkpoint under its name
        else:
            p.unlink()
        removed.append(p.name)
    return removed


def refuse_foreign(run_dir: Path) -> None:
    """Raise InputError naming what `run_dir` holds that gptcli did not write (if anything)."""
    foreign = foreign_entries(run_dir)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(f"{run_dir}: not a gptcli run directory: it holds {len(foreign)} thing(s) gptcli did not "
                         f"write ({shown}); gptcli never deletes them; choose an empty or new folder")


def _has_run_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name not in LOCK_FILES for p in run_dir.iterdir())


# ---------------------------------------------------------------- train


def resolve_train(
    config: Optional[Path],
    sets: Optional[list[str]],
    overrides: dict[str, Any],
    *,
    out: Optional[Path] = None,
    name: Optional[str] = None,
    resume: bool = False,
    overwrite: bool = False,
    init_from: Optional[Path] = None,
    root: Path = CHECKPOINTS_ROOT,
) -> Plan:
    """The config, run directory and mode of `gptcli train`.

    Raises:
        InputError: contradictory flags (naming both), a run directory that is not ours,
            a resumed run whose config would change outside ``RESUMABLE``.
    """
    for a, b in (("out", "name"), ("resume", "overwrite"), ("resume", "init_from")):
        given = {"out": out, "name": name, "resume": resume or None, "overwrite": overwrite or None,
                 "init_from": init_from}
        if given[a] is not None and given[b] is not None:
            raise InputError(f"{a}={given[a]} and {b}={given[b]}: give one of them ({_WHY_NOT_BOTH[a, b]})",
                             param=a)
    layers = config_layers(config, overrides, sets or ())
    notes: list[str] = []
    init_cfg = None
    if init_from is not None and config is None:  # continued pretraining with the weights' own config
        init_ckpt, _ = _checkpoint_dir(init_from, "init_from")
        init_cfg = _saved_config(init_ckpt)
        notes.append(f"config: the model of init_from={init_from} ({init_ckpt / CONFIG}); `config` chooses another")
    if out is not None:
        run_dir = out
    elif name is not None:
        run_dir = named_dir(root, name, "name")
    else:
        cfg_dir = build_config(layers, init_cfg).train.out_dir
        stem = config.stem if config is not None else _source_name(init_from) if init_from is not None else "default"
        run_dir = Path(cfg_dir) if cfg_dir else root / stem
        if init_from is not None and not cfg_dir and _inside(init_from, run_dir):
            run_dir = root / f"{stem}-continued"  # never the source run itself
        why = "train.out_dir" if cfg_dir else "named after `config`" if config is not None else (
            "named after `init_from`" if init_from is not None else "no `config`")
        notes.append(f"run directory: {run_dir} ({why}; `out` or `name` chooses another)")
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: exists and is not a directory")

    if resume:
        if not run_dir.is_dir():
            raise InputError(f"resume=True: {run_dir} does not exist: nothing to resume (start the run without it)",
                             param="resume")
        refuse_foreign(run_dir)
        if not _has_run_files(run_dir):
            raise InputError(f"resume=True: {run_dir} holds no run: nothing to resume (start the run without it)",
                             param="resume")
        latest, skipped = find_latest(run_dir)  # the newest that verifies, whatever `latest` says
        if latest is None and skipped:  # damaged checkpoints are never deleted by a restart
            raise InputError(f"resume=True: no complete checkpoint in {run_dir} ({skipped[0]})", param="resume")
        if latest is None:
            # Our own run, stopped before its first step checkpoint: nothing to continue, start it again with
            # its own config (a weights-only best/ holds no training state and is replaced by the new run's).
            saved, where = _restart_config(run_dir, config)
            saved = _absolute(saved) if saved is not None else None  # paths compared as they are used: absolute
            cfg = _absolute(build_config(layers, saved))
            if saved is not None:
                _refuse_changes(saved, cfg, layers)
            notes.append(f"{run_dir}: no step checkpoint yet (the run stopped before its first save): starting it "
                         f"over with {where}")
            return Plan(cfg, "restart", run_dir=run_dir, notes=notes)
        saved = _absolute(_saved_config(latest))
        cfg = _absolute(build_config(layers, saved))
        _refuse_changes(saved, cfg, layers)
        return Plan(cfg, "resume", checkpoint=latest, run_dir=run_dir, notes=notes)

    cfg = _absolute(build_config(layers, init_cfg))
    if run_dir.is_dir():
        refuse_foreign(run_dir)
        if overwrite:
            return Plan(cfg, "overwrite", run_dir=run_dir, init_from=init_from, notes=notes)
        if _has_run_files(run_dir):
            steps = list_step_checkpoints(run_dir)
            if steps:
                raise InputError(f"{run_dir}: a gptcli run with checkpoints (newest {steps[-1].name}); "
                                 "pass resume=True to continue it or overwrite=True to start it over")
            if (run_dir / "best").is_dir() and not (run_dir / "best").is_symlink():
                raise InputError(f"{run_dir}: a gptcli run with no step checkpoint but the weights-only "
                                 f"{run_dir / 'best'} (its lowest validation loss); starting it over would delete "
                                 "them: pass resume=True to start it over with its own config or overwrite=True "
                                 f"with the one given (either replaces best/), or init_from={run_dir / 'best'} to "
                                 "train a new run from those weights")
            notes.append(f"{run_dir}: a gptcli run with no checkpoint yet (it stopped before its first save): "
                         "starting it over")
            return Plan(cfg, "restart", run_dir=run_dir, init_from=init_from, notes=notes)
    return Plan(cfg, "new", run_dir=run_dir, init_from=init_from, notes=notes)


def _restart_config(run_dir: Path, config: Optional[Path]) -> tuple[Optional[Config], str]:
    """(the config a run without a step checkpoint is started over with, how a note names it).

    Its own: the resolved config saved in its weights-only best/ checkpoint, else the config file its
    run.json names (or the defaults it names). `config`, when given, goes on top (as in any resume).

    Raises:
        InputError: the run's config cannot be found and `config` is not given.
    """
    best = run_dir / "best"
    if best.is_dir() and not best.is_symlink() and _checkpoint_kind(best) == "verified":
        return _saved_config(best), f"its own config {best / CONFIG}"
    if config is not None:
        return None, f"config={config}"
    source = read_json_object(run_dir / RUN_JSON).get("config_source")
    if source == "<defaults>":
        return None, f"its own config, the defaults ({run_dir / RUN_JSON}: config_source)"
    if isinstance(source, str) and Path(source).is_file():
        return _absolute(load_config(source)), f"its own config {source} ({run_dir / RUN_JSON}: config_source)"
    raise InputError(f"resume=True: {run_dir} stopped before its first checkpoint and its config "
                     f"({source or 'not recorded'}) cannot be found; pass config=FILE to start it over",
                     param="resume")


def resolve_config(config: Optional[Path], sets: Optional[list[str]], overrides: dict[str, Any]) -> Config:
    """The config of a command that reads a config but no run (`plan`): train's layers and precedence.

    Raises:
        InputError: a bad config file, key or value (named).
    """
    return _absolute(build_config(config_layers(config, overrides, sets or ())))


_WHY_NOT_BOTH = {
    ("out", "name"): "a name means the run directory checkpoints/NAME",
    ("resume", "overwrite"): "resuming continues the run, overwriting deletes it",
    ("resume", "init_from"): "a resumed run continues from its own checkpoint",
}


def _source_name(path: Path) -> str:
    """A run's name for weights at `path`: the run of a step checkpoint, else the folder's own name."""
    path = path.resolve()
    return path.parent.name if STEP_DIR.match(path.name) else path.name


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _refuse_changes(saved: Config, cfg: Config, layers: list[Layer]) -> None:
    """Refuse every given key outside RESUMABLE whose value differs from the run's saved config."""
    before, after = saved.to_dict(), cfg.to_dict()
    diffs = {}
    for layer in layers:  # later layers win, as in the config itself
        for section, values in layer.values.items():
            for key in values:
                dotted = f"{section}.{key}"
                if dotted not in RESUMABLE and after[section][key] != before[section][key]:
                    diffs[dotted] = f"{dotted} {before[section][key]!r} vs {after[section][key]!r} (from {layer.source})"
    if diffs:
        raise InputError(
            f"resume=True: the run's config differs (run vs given): {'; '.join(diffs.values())}; a resumed run "
            f"keeps its config except {', '.join(RESUMABLE)} (start a new run with init_from=CHECKPOINT to change "
            "the rest)", param="resume")


def _absolute(cfg: Config) -> Config:
    """Make the config's paths absolute (a checkpoint's config then works from any folder)."""
    cfg.data.path = map_paths(cfg.data.path, lambda p: str(Path(p).expanduser().absolute()))
    if cfg.train.out_dir:
        cfg.train.out_dir = str(Path(cfg.train.out_dir).expanduser().absolute())
    for spec in cfg.train.eval_tasks:  # a task file of --set, like data.path: resumed from any folder
        if spec.get("data"):
            spec["data"] = str(Path(spec["data"]).expanduser().absolute())
    return cfg


# ---------------------------------------------------------------- eval, loss, generate


def resolve_model(
    checkpoint: Optional[Path],
    config: Optional[Path],
    sets: Optional[list[str]],
    overrides: dict[str, Any],
    *,
    search: bool = True,
    root: Path = CHECKPOINTS_ROOT,
) -> Plan:
    """The model and config of `eval`, `loss` and `generate`.

    - ``--checkpoint``: its weights and saved config; `--config`, `--set` and flags apply on top,
      except model keys that differ from the checkpoint's (refused by name).
    - ``--config`` alone: that config's run (train.out_dir or checkpoints/<file stem>) if it has a
      checkpoint, else an untrained model of that config; never another run's model.
    - neither: the newest checkpoint under `root`, else an untrained model of the defaults.
    Every choice made without a flag is a note.

    Raises:
        InputError: a model key that contradicts the checkpoint; a bad config or override.
        RunError: the checkpoint is missing, incomplete or corrupted.
    """
    layers = config_layers(config, overrides, sets or ())
    notes: list[str] = []
    named = checkpoint  # what the user named (a choice of ours is said where it is made)
    passed_over = None  # choosing the newest checkpoint under root: the damaged newer ones it skipped
    if checkpoint is None and config is not None:
        own = build_config(layers).train.out_dir
        run_dir = Path(own) if own else root / config.stem
        latest, skipped = find_latest(run_dir) if run_dir.is_dir() else (None, [])
        damaged = f"; skipped {len(skipped)} damaged: {'; '.join(skipped)}" if skipped else ""
        if latest is not None:
            checkpoint = run_dir
            notes.append(f"{'warning: ' if skipped else ''}model: {latest} (the run of config={config}; "
                         f"`checkpoint` chooses another{damaged})")
        elif skipped:  # a trained run whose every checkpoint is damaged: never an untrained model in its place
            raise RunError(f"{run_dir} (the run of config={config}) holds no checkpoint that verifies{damaged}; "
                           "`checkpoint` chooses another")
        else:
            notes.append(f"model: untrained, from config={config} (no checkpoint in {run_dir}; "
                         "`checkpoint` chooses one)")
            return Plan(build_config(layers), "model", notes=notes)
    elif checkpoint is None and search:
        newest, skipped = find_newest_anywhere(root)
        if newest is not None:
            # A run's step is loaded as that run's newest: the run, if it trains, may prune this one meanwhile.
            checkpoint = newest.parent if STEP_DIR.match(newest.name) else newest
            passed_over = skipped
        elif skipped:
            raise RunError(f"{root}/ holds no checkpoint that verifies; skipped {len(skipped)} damaged: "
                           f"{'; '.join(skipped)}; `checkpoint` chooses one")
        else:
            notes.append(f"model: untrained (no checkpoint under {root}/; `checkpoint` chooses one)")
            return Plan(build_config(layers), "model", notes=notes)
    elif checkpoint is None:
        return Plan(build_config(layers), "model", notes=notes)
    ckpt = load_checkpoint(checkpoint)
    if passed_over is not None:
        skipped = list(dict.fromkeys(passed_over + ckpt.skipped))  # a damaged step may be in both
        damaged = f"; skipped {len(skipped)} newer damaged: {'; '.join(skipped)}" if skipped else ""
        notes.append(f"{'warning: ' if skipped else ''}model: {ckpt.path} (the newest checkpoint under {root}/; "
                     f"`checkpoint` chooses another{damaged})")
    if named is not None and (note := checkpoint_note(named, ckpt.path, ckpt.skipped)):
        notes.append(note)
    cfg = build_config(layers, _from_checkpoint(ckpt.config, ckpt.path))
    for layer in reversed(layers):
        for key, value in (layer.values.get("model") or {}).items():
            if key not in EVAL_FREE_MODEL_KEYS and getattr(cfg.model, key) != getattr(ckpt.config.model, key):
                raise InputError(f"model.{key}: {getattr(cfg.model, key)!r} (from {layer.source}) differs from the "
                                 f"checkpoint's {getattr(ckpt.config.model, key)!r} ({ckpt.path}); the model's shape "
                                 "and math come from its checkpoint")
    ckpt.config = cfg
    return Plan(cfg, "model", checkpoint=ckpt.path, ckpt=ckpt, notes=notes)


def checkpoint_note(named: Path, path: Path, skipped: list[str]) -> Optional[str]:
    """The one line saying which checkpoint `path` of run `named` is used, when it is neither `named` nor what
    its `latest` names (`latest` dangling, newer checkpoints damaged: `skipped`); None when it is."""
    used = path.resolve()
    latest = pointer_target(named / "latest")
    if used in {named.resolve(), *(t.resolve() for t in (pointer_target(named), latest) if t is not None)}:
        return None
    why = ("it has no latest" if latest is None else f"its latest names {latest.name}" +
           ("" if latest.is_dir() else ", which is missing"))
    if skipped:
        return (f"warning: model: {path} (the newest checkpoint of {named} that verifies; {why}; skipped "
                f"{len(skipped)} damaged: {'; '.join(skipped)})")
    return f"model: {path} (the newest checkpoint of {named} that verifies; {why})"


def build_model(plan: Plan, seed: Optional[int]):
    """(model in eval mode on the config's device, description): the checkpoint's weights or a seeded init."""
    import torch

    from gptcli.checkpoint import model_from_checkpoint
    from gptcli.device import resolve_device
    from gptcli.model import GPTModel

    if plan.ckpt is not None:
        return model_from_checkpoint(plan.ckpt, plan.cfg.train.device), str(plan.ckpt.path)
    device = resolve_device(plan.cfg.train.device)
    seed = plan.cfg.train.seed if seed is None else seed
    torch.manual_seed(seed)
    return GPTModel(plan.cfg.model).to(device).eval(), f"untrained (seed {seed})"


def load_model(
    checkpoint: Optional[Path],
    config: Optional[Path],
    sets: Optional[list[str]],
    overrides: dict[str, Any],
    seed: Optional[int] = None,
    *,
    root: Path = CHECKPOINTS_ROOT,
):
    """(model, plan, description): `resolve_model` and `build_model` in one step, for commands that read no data first.

    The plan's notes say what was chosen without being asked; the caller shows them.
    """
    plan = resolve_model(checkpoint, config, sets, overrides, root=root)
    model, where = build_model(plan, seed)
    return model, plan, where


def run_or_newest(run: Optional[Path], root: Path = CHECKPOINTS_ROOT) -> tuple[Path, list[str]]:
    """(`run`, no notes) when given, else the newest run under `root` and the note that says so.

    Raises:
        RunError: none given and none under `root`.
    """
    if run is not None:
        return run, []
    newest, note = newest_run(root)
    return newest, [note]


def eval_validation(cfg: Config, files: list[str], val: Optional[bool], text: bool = False) -> tuple[bool, list[str]]:
    """(whether `eval` evaluates the config's validation split, notes; also on the folders among `files`).

    Args:
        val: asked for (True), refused (False) or not said (None: yes, unless only `files`
            were given and the corpus is not on disk: they never trigger a download).
        text: a text is scored instead of datasets (no split is read).

    Raises:
        InputError: the split is wanted and its corpus is missing (the default corpus is downloaded).
    """
    notes = []
    if val is None and files and not text and not corpus_available(cfg):
        val = False
        notes.append(f"validation split skipped: its corpus {cfg.data.path} (data.path from "
                     f"{describe_origin(cfg, 'data.path')}) is not on disk; val=True evaluates it "
                     "(downloading the default corpus)")
    if val is not False and not text:
        notes += check_data_path(cfg)
    return val is not False and not text, notes + skipped_files_notes(files)


def newest_run(root: Path = CHECKPOINTS_ROOT) -> tuple[Path, str]:
    """(the run directory of the newest checkpoint under `root`, or that checkpoint itself; the note).

    Raises:
        RunError: there is none.
    """
    newest, _ = find_newest_anywhere(root)
    if newest is None:
        raise RunError(f"{root}: no checkpoint found; pass a run directory")
    run = newest.parent if STEP_DIR.match(newest.name) else newest
    return run, f"run: {run} (the newest under {root}/; name a run directory to choose another)"


# ---------------------------------------------------------------- data paths


def check_data_path(cfg: Config, flag: Optional[str] = None) -> list[str]:
    """Refuse a missing corpus, saying where its path came from (the default corpus is downloaded).

    Args:
        flag: the flag that gave the path, when one did (e.g. ``--data``).

    Returns:
        Notes: a folder's files that its reader leaves out (see ``skipped_files_notes``).

    Raises:
        InputError: the path does not exist.
    """
    mixture = isinstance(cfg.data.path, list)
    paths = [Path(e["path"]) for e in cfg.data.path] if mixture else [Path(cfg.data.path)]
    for i, path in enumerate(paths):
        if not (path.exists() or (not mixture and path.name == Path(DEFAULT_CORPUS).name)):
            key = f"data.path[{i}]" if mixture else "data.path"
            raise InputError(not_found(path, f"{key} from {flag or describe_origin(cfg, 'data.path')}"))
    check_split_keys(cfg)
    return [] if mixture else skipped_files_notes([cfg.data.path])


def skipped_files_notes(paths: list[str]) -> list[str]:
    """A warning for each folder of text among `paths` holding files that its reader (prepare's) leaves
    out for their suffix (``notes.md``, ``UP.TXT``), as `prepare` warns: the data read is then not all
    that the folder holds."""
    notes = []
    for path in map(Path, paths):
        if path.is_dir() and not is_prepared(path):
            skipped: list[Path] = []
            try:
                find_sources([path], skipped=skipped)
            except InputError:  # nothing to read at all: reading the folder says so
                pass
            if skipped:
                notes.append(f"warning: {path}: {skipped_note(skipped)}")
    return notes


def check_split_keys(cfg: Config) -> None:
    """Refuse ``data.train_ratio`` asked for a corpus whose split it cannot change: a prepared
    corpus or a mixture keeps the split `gptcli prepare --val-ratio` made. A value equal to the
    default (the shipped configs name it) or from a checkpoint's config is not a request.

    Raises:
        InputError: naming the key, its value and where it came from.
    """
    d = cfg.data
    origin = describe_origin(cfg, "data.train_ratio")
    if d.train_ratio == DataConfig.train_ratio or origin.startswith("the checkpoint"):
        return
    if isinstance(d.path, list) or is_prepared(Path(d.path)):
        what = "a mixture of prepared corpora" if isinstance(d.path, list) else f"{d.path}, a prepared corpus,"
        raise InputError(f"data.train_ratio {d.train_ratio} (from {origin}) does not apply: {what} keeps the split "
                         f"that `gptcli prepare --val-ratio` made; drop the key (or prepare again)")


def corpus_available(cfg: Config) -> bool:
    """Whether the config's corpus is on disk (evaluating its split then needs no download)."""
    if isinstance(cfg.data.path, list):
        return all(Path(e["path"]).exists() for e in cfg.data.path)
    return Path(cfg.data.path).exists()


def describe_origin(cfg: Config, key: str) -> str:
    """Where the value of dotted `key` came from, for a message: a file, --set, a checkpoint's config."""
    return cfg.origin(key)


def _from_checkpoint(cfg: Config, ckpt_dir: Path) -> Config:
    """Tag every value of a checkpoint's saved config with where it came from."""
    cfg.origins = {key: f"the checkpoint's config {ckpt_dir / CONFIG}" for key in cfg.origins}
    return cfg


def _checkpoint_dir(path: Path, param: str) -> tuple[Path, list[str]]:
    from gptcli.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(path, check_hashes=False)
    except RunError as e:
        raise InputError(f"{param}: {e}", param=param) from None


def _saved_config(ckpt_dir: Path) -> Config:
    """The config saved in a checkpoint directory (its data.path made absolute if it was relative)."""
    import yaml

    try:
        raw = yaml.safe_load((ckpt_dir / CONFIG).read_text(encoding="utf-8"))
        return _from_checkpoint(config_from_dict(raw or {}, str(ckpt_dir / CONFIG)), ckpt_dir)
    except (OSError, yaml.YAMLError, ConfigError, AttributeError) as e:
        raise RunError(f"{ckpt_dir / CONFIG}: invalid checkpoint config ({e})") from None

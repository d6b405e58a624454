"""The `gptcli` command line: parse, call the library, render, exit.

stdout carries results (text, tables, --json objects); progress, warnings and
errors go to stderr. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input,
129/130/143 interrupted by SIGHUP/SIGINT/SIGTERM, 141 stdout closed by its reader.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

try:  # recent Typer vendors its own click; its usage exceptions are the ones raised
    from typer import _click as click
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older Typer uses click itself
    import click
    from click import get_current_context

from gptcli.errors import GptcliError, InputError, first_line
from gptcli.progress import PrepareProgress, Renderer, TrainProgress, corpus_download, download_progress, err as _err

# Flags renamed for one spelling per concept (the book's name where the book has one): the old
# spelling still works, with a warning naming the new one.
RENAMED_FLAGS = {"--num-batches": "--eval-iter"}


def _renamed_flags(args: list[str]) -> list[str]:
    """`args` with each deprecated flag spelled anew (a one-line warning each); options end at `--`."""
    out = []
    for i, a in enumerate(args):
        if a == "--":
            return out + args[i:]
        old, eq, value = a.partition("=")
        if old in RENAMED_FLAGS:
            _err(f"warning: {old} is deprecated; use {RENAMED_FLAGS[old]}")
            a = RENAMED_FLAGS[old] + eq + value
        out.append(a)
    return out


class _OneLineErrors(TyperGroup):
    """Report usage errors as one line on stderr (exit 2) instead of click's usage block.

    Also the one owner of gptcli's output streams: stdout and stderr are wrapped in `_Output`
    for the whole command, and stdout is flushed here, so a closed pipe or a full disk ends
    the command the same way whichever write meets it (see `_output_failed`).
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Output(streams[0], "stdout"), _Output(streams[1], "stderr")
        try:
            args = _state["args"] = _renamed_flags(list(sys.argv[1:] if args is None else args))
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            sys.stdout.flush()  # here, not at interpreter exit, where a failing flush cannot be reported
        except click.exceptions.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "gptcli"
            click.echo(f"{where}: {e.format_message()} (see --help)", err=True)
            rv = 2
        except typer.Abort:
            click.echo("gptcli: aborted", err=True)
            rv = 130
        except click.ClickException as e:
            click.echo(f"gptcli: {e.format_message()}", err=True)
            rv = e.exit_code
        except _OutputFailed as e:
            rv = _output_failed(e)
        finally:
            sys.stdout, sys.stderr = streams
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head -1`


class _OutputFailed(Exception):
    """A write to stdout failed: a closed pipe (EPIPE), a full disk (ENOSPC), a closed descriptor (EBADF)."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.errno = error.errno
        self.strerror = error.strerror or str(error)


def _output_failed(e: _OutputFailed) -> int:
    """The exit code for a failed stdout write; one line on stderr unless the reader just left."""
    if e.errno == errno.EPIPE:
        return EXIT_CLOSED_PIPE  # `gptcli ... | head`: the reader has what it wanted
    _err(f"error: cannot write to stdout: {e.strerror}")
    return 1


class _Output:
    """sys.stdout or sys.stderr as gptcli writes them.

    Python ignores SIGPIPE, so a write into a closed pipe raises BrokenPipeError; a closed
    terminal gives EIO, a full disk ENOSPC, and a descriptor closed at start (`>&-`) leaves
    the stream None. stderr carries commentary: after its first failed write it goes quietly
    to devnull and a training run goes on. stdout carries the result: its first failed write
    raises `_OutputFailed`, later writes are dropped. Either way the descriptor is pointed at
    devnull, so the interpreter's final flush cannot fail again (the Python docs' "Note on SIGPIPE").
    """

    def __init__(self, stream, name: str):
        self._stream = stream
        self.name = name
        self.dead = False

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # as a text stream answers (click probes with b"")
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:  # click's probe for a text stream: nothing to write, nothing can fail
            return 0
        if not self.dead:
            try:
                if self._stream is None:
                    raise OSError(errno.EBADF, os.strerror(errno.EBADF))
                return self._stream.write(text)
            except OSError as e:
                self._fail(e)
        return len(text)

    def flush(self) -> None:
        if not self.dead and self._stream is not None:
            try:
                self._stream.flush()
            except OSError as e:
                self._fail(e)

    def isatty(self) -> bool:
        return not self.dead and self._stream is not None and self._stream.isatty()

    def __getattr__(self, name: str):
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)

    def _fail(self, error: OSError) -> None:
        self.dead = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no descriptor (a test runner's buffer, or closed)
            pass
        if self.name == "stdout":
            raise _OutputFailed(error) from None


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"gptcli {version('gptcli')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("gptcli (not installed)")
        raise typer.Exit(0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Pretrain, evaluate and sample GPT models from scratch (the book's chapter 5, as a tool).",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)
_state: dict[str, Any] = {"debug": bool(os.environ.get("GPTCLI_DEBUG")), "args": []}  # args: as parsed


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print gptcli's version and exit.", is_eager=True,
                                          callback=_version)] = False,
) -> None:
    """Pretrain, evaluate and sample GPT models from scratch."""
    _state["debug"] = _state["debug"] or debug


def _expand_home(value):
    """A path flag's leading ``~`` expanded, as a shell does for ``--out ~/x`` but not for
    ``--out=~/x`` (which made a folder literally named ``~``, one ``rm -rf ~`` from disaster)."""
    if isinstance(value, Path) and value.parts and value.parts[0].startswith("~"):
        return value.expanduser()
    if isinstance(value, list):
        return [_expand_home(v) for v in value]
    return value


def _handle_errors(fn):
    """Turn library exceptions into one line on stderr and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs = {name: _expand_home(value) for name, value in kwargs.items()}
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except _OutputFailed as e:
            raise typer.Exit(_output_failed(e)) from None
        except GptcliError as e:
            if _state["debug"]:
                raise
            _err(f"error: {_in_flags(str(e), e.param)}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # a bug: say so in one line, traceback with --debug
            if _state["debug"]:
                raise
            _err(f"internal error: {type(e).__name__}: {first_line(e)} (rerun with --debug for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


# ---------------------------------------------------------------- library names -> flags

_KEYWORD = re.compile(r"\b([a-z][a-z0-9_]*)=([^\s,;]*?)(?=$|[\s,;)]|:\s)")  # top_k=5, overwrite=True
_NAMED = re.compile(r"`([a-z][a-z0-9_.]*)`")  # `val_ratio`: a parameter or config key named in passing


def _in_flags(message: str, param: Optional[str] = None) -> str:
    """A library message in the running command's flags.

    The library names what a notebook caller passes: keywords (``overwrite=True``,
    ``top_k=5``) become ``--overwrite``, ``--top-k 5``, a name in backquotes its flag; the leading parameter or config key
    of the error becomes its flag (``top_k`` -> ``--top-k``, ``train.max_steps`` ->
    ``--max-steps (train.max_steps)``). Names the command has no flag for stay as they are.
    """
    ctx = get_current_context(silent=True)
    options = {p.name: p for p in ctx.command.params if p.param_type_name == "option"} if ctx is not None else {}

    def flag(name: str) -> Optional[str]:
        if "." in name:  # a config key: the command's dedicated flag for it, if any
            from gptcli.config import flag_name

            return next((o for p in options.values() for o in p.opts if o == flag_name(name)), None)
        option = options.get(name)
        return next((o for o in option.opts if o.startswith("--")), None) if option is not None else None

    def keyword(m: re.Match) -> str:
        name, value = m.groups()
        f = flag(name)
        if f is None:
            return m.group(0)
        if value == "True":
            return f
        if value == "False":
            return options[name].secondary_opts[0] if options[name].secondary_opts else m.group(0)
        return f"{f} {value}"

    message = _KEYWORD.sub(keyword, message)
    message = _NAMED.sub(lambda m: flag(m.group(1)) or m.group(0), message)
    if param and message.startswith(param) and not message[len(param):].startswith("="):
        f = flag(param)
        if f is not None:
            message = (f"{f} ({param})" if "." in param else f) + message[len(param):]
    return message


def _warn(message: str) -> None:
    """A library warning, in the command's flags."""
    _err(f"warning: {_in_flags(message)}")


def _notes(notes) -> None:
    """Say on stderr, one line each, what the tool chose by itself."""
    for note in notes:
        _err(_in_flags(note))


def _print_json(obj: Any) -> None:
    print(json.dumps(_json_safe(obj), indent=2, default=_json_default, allow_nan=False))


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _json_safe(x: Any) -> Any:
    """NaN/inf become null (JSON has no such numbers)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


# ---------------------------------------------------------------- shared options

def _existing(kind: str):
    """A Typer parser for a flag naming an existing file or dir that expands a leading ``~`` before checking it
    (``--config=~/c.yaml``, which the shell leaves alone, was 'does not exist'; README: ~ is expanded in path flags)."""

    def parse(value: str) -> Path:
        path = Path(value).expanduser()
        if not (path.is_file() if kind == "file" else path.is_dir()):
            why = "does not exist" if not path.exists() else "is a directory" if kind == "file" else "is not a directory"
            raise typer.BadParameter(f"{kind} {value!r} {why}")
        return path

    return parse


ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config (default: the book's GPT-2 124M, context 256).",
                 parser=_existing("file"), metavar="FILE"),
]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a config key: section.key=value (repeatable); beside a checkpoint a model key is refused.")
]


def _checked(check):
    """A Typer callback that runs a library check on a given option value; its error becomes a usage error (exit 2)."""

    def callback(value):
        if value is not None:
            try:
                check(value)
            except InputError as e:  # click names the flag itself: keep what follows the parameter
                message = str(e)
                if e.param and message.startswith(e.param):
                    message = message[len(e.param):].lstrip(": ")
                raise typer.BadParameter(message) from None
        return value

    return callback


def _check_device(name: str) -> None:
    from gptcli.device import check_device_name

    check_device_name(name)


def _check_seed(seed: int) -> None:
    from gptcli.config import check_seed

    check_seed(seed, "--seed")


DeviceOpt = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N | mps (default: the config's, auto).",
                                                  callback=_checked(_check_device))]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout, for scripts.")]
CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", help="Checkpoint or run directory (default: --config's run, else the newest under checkpoints/)."),
]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed (model init when untrained; sampling).",
                                                callback=_checked(_check_seed))]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Text file (.txt, .txt.gz), JSON Lines (.jsonl, .jsonl.gz), a folder of them, or prepared shards.")]
EvalIterOpt = Annotated[Optional[int], typer.Option("--eval-iter", min=1, help="At most this many batches per split or dataset (the book's eval_iter; default: all).")]

CHECKPOINTS_ROOT = Path("checkpoints")


# ---------------------------------------------------------------- train


@app.command()
@_handle_errors
def train(
    config: ConfigOpt = None,
    data: DataOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory (default: checkpoints/<--name or config name>).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name: the run directory is checkpoints/NAME.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run (--out or --name) from its newest valid checkpoint, with its config.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start an existing gptcli run over (deletes only the run's own files).")] = False,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from these weights (continued pretraining).")] = None,
    allow_data_change: Annotated[bool, typer.Option("--allow-data-change", help="With --resume: continue on a corpus other than the run's.")] = False,
    device: DeviceOpt = None,
    num_epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs over the training windows.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many optimizer steps.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(min=1, help="Stop after this many training tokens.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Windows per micro-batch (per process).")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    seed: SeedOpt = None,
    nproc: Annotated[Optional[int], typer.Option(min=1, help="Launch this many processes with torchrun.")] = None,
    sets: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Train a model (the book's train_model_simple: AdamW, periodic evaluation, epoch samples)."""
    from gptcli import distributed
    from gptcli.resolve import check_data_path, resolve_train
    from gptcli.train import Interrupted, apply_host_memory, train as run_training

    if nproc is not None and nproc > 1 and not distributed.launched_by_torchrun():
        raise typer.Exit(distributed.relaunch_with_torchrun(nproc, _without_option(_state["args"], "--nproc")))
    if allow_data_change and not resume:
        raise InputError("--allow-data-change: only with --resume (a new run takes any corpus)")
    overrides = {"data.path": str(data) if data else None, "train.device": device, "train.num_epochs": num_epochs,
                 "train.max_steps": max_steps, "train.max_tokens": max_tokens, "train.batch_size": batch_size,
                 "train.learning_rate": learning_rate, "train.seed": seed}
    main = distributed.is_main_process()  # under torchrun rank 0 reports for every rank
    try:
        plan = resolve_train(config, sets, overrides, out=out, name=name, resume=resume, overwrite=overwrite,
                             init_from=init_from, root=CHECKPOINTS_ROOT)
        notes = plan.notes + check_data_path(plan.cfg, "--data" if data else None)
        with TrainProgress([_in_flags(n) for n in notes], plan.cfg.data.path, quiet=not main) as events:
            if note := apply_host_memory(plan.cfg.train.host_memory):  # process-wide: set here, at the entry point
                events.warn(note)
            summary = run_training(plan.cfg, plan.run_dir, resume=plan.mode == "resume", init_from=init_from,
                                   overwrite=plan.mode in ("overwrite", "restart"), events=events,
                                   allow_data_change=allow_data_change)
    except (Interrupted, InputError) as e:  # every rank meets it: rank 0 alone says so
        if main and isinstance(e, InputError):
            raise
        if main:  # Interrupted: the checkpoint is saved, and the message says how to go on
            if e.summary is not None:  # the signal came as the run finished: its result all the same
                _print_train_result(e.summary, json_out)
            _err(str(e))
        raise typer.Exit(e.exit_code) from None
    if main:
        _print_train_result(summary, json_out)


def _print_train_result(summary: dict[str, Any], json_out: bool) -> None:
    if json_out:
        _print_json(summary)
    else:
        print(summary["checkpoint"])


def _without_option(args: list[str], option: str) -> list[str]:
    """`args` less `option` and its value (given as `option VALUE` or `option=VALUE`)."""
    out, skip = [], False
    for a in args:
        if not skip and a != option and not a.startswith(option + "="):
            out.append(a)
        skip = a == option
    return out


class XAxis(str, Enum):
    step = "step"
    tokens = "tokens"
    time = "time"


XOpt = Annotated[XAxis, typer.Option("--x", help="The curves' x-axis: step, tokens (seen) or time (training seconds).")]
PlotOutOpt = Annotated[Optional[Path], typer.Option("--out", help="The PNG to write (default: beside the first run).",
                                                    dir_okay=False)]


@app.command()
@_handle_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories holding metrics.jsonl (several: one overlaid plot).")],
    x: Annotated[Optional[XAxis], typer.Option("--x", help="Overlaid curves against step, tokens (default) or time; one run without --x or --out: its own losses.png.")] = None,
    out: PlotOutOpt = None,
    baseline: Annotated[Optional[str], typer.Option(help="Draw this GPT-2 size's published figures (gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1558m) as horizontal lines (one run's own plot).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Redraw losses.png and metrics.csv (not while the run trains) of a run from its metrics.jsonl; several runs: their curves overlaid."""
    from gptcli import report
    from gptcli.runs import plot_runs, redraw
    from gptcli.tasks import baseline as load_baseline

    figures = load_baseline(baseline) if baseline is not None else None
    if len(runs) == 1 and out is None and x is None:  # today's plot: the book's, into the run
        if not (runs[0] / report.METRICS).is_file():
            raise InputError(f"{runs[0]}: no {report.METRICS} (not a run directory?)")
        drawn = redraw(runs[0], figures)
        if "csv" not in drawn:
            _err(f"{runs[0]}: training now, which keeps {report.CSV} up to date itself; redrew {report.PLOT} only")
        return _print_json({"plot": drawn["plot"], "csv": drawn.get("csv")}) if json_out else print(drawn["plot"])
    if figures is not None:
        raise InputError("--baseline: draws on one run's own plot (not with several runs, --x or --out)")
    drawn = plot_runs(runs, _plot_out(runs, out), (x or XAxis.tokens).value)
    _print_json({"plot": drawn}) if json_out else print(drawn)


@app.command("runs")
@_handle_errors
def runs_(
    root: Annotated[Path, typer.Argument(help="The folder holding the runs.")] = CHECKPOINTS_ROOT,
    json_out: JsonOpt = False,
) -> None:
    """List the runs under checkpoints/ (or ROOT): state, steps, tokens, losses, tokens/s, wall time, config differences."""
    from gptcli.checkpoint import MANIFEST
    from gptcli.runs import list_runs

    result = list_runs(root)
    if not result["runs"]:  # an empty table alone would not say why
        hint = (f"a checkpoint of the run {root.parent}: gptcli runs {root.parent.parent}" if (root / MANIFEST).is_file()
                else "give the folder that holds the runs")
        _err(f"no gptcli runs in {root} ({hint})")
    _render_runs(result, json_out)


@app.command()
@_handle_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (one or more; their curves overlaid in one plot).")],
    x: XOpt = XAxis.tokens,
    out: PlotOutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare runs: config differences, final and best metrics, and one PNG of their loss curves overlaid."""
    from gptcli.runs import compare as compare_runs, plot_runs

    result = compare_runs(runs)
    result["plot"] = str(plot_runs(runs, _plot_out(runs, out), x.value))
    _render_runs(result, json_out)


def _plot_out(runs: list[Path], out: Optional[Path]) -> Path:
    """--out, or the default beside the first run (said on stderr)."""
    from gptcli.runs import default_plot_path

    if out is None:
        out = default_plot_path(runs)
        _err(f"plot: {out} (beside the first run; --out chooses another file)")
    return out


@app.command("plan")
@_handle_errors
def plan_(
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Windows per micro-batch (per process).")] = None,
    memory_limit: Annotated[Optional[str], typer.Option(help="Memory one process may use, e.g. 16GB (default: the device's).")] = None,
    probe_steps: Annotated[int, typer.Option(min=0, help="Real steps timed for the time estimate (0: none).")] = 2,
    verify: Annotated[bool, typer.Option("--verify", help="Run a real step at the largest batch that fits and at one more.")] = False,
    sets: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Plan a run without training: parameters, FLOPs, steps, memory per device, the largest batch that fits, time."""
    from gptcli.plan import parse_bytes, plan_run
    from gptcli.resolve import check_split_keys, resolve_config

    cfg = resolve_config(config, sets, {"train.device": device, "train.batch_size": batch_size})
    check_split_keys(cfg)
    limit = parse_bytes(memory_limit) if memory_limit is not None else None
    result = plan_run(cfg, limit, probe_steps, verify)
    for note in result["notes"]:
        _err(note)
    if json_out:
        _print_json(_json_safe(result))
    else:
        _render_plan(result)


def _render_plan(r: dict[str, Any]) -> None:
    gib = lambda n: f"{n / 2**30:.3f} GiB" if n is not None else ""  # noqa: E731
    rows = [("parameters", f"{r['params']:,}"), ("FLOPs per token (training)", f"{r['flops_per_token']:.4g}")]
    for key, label in (("tokens_per_epoch", "tokens per epoch"), ("steps_per_epoch", "steps per epoch"),
                       ("steps", "steps"), ("tokens", "tokens")):
        if r.get("data"):
            rows.append((label, f"{r['data'][key]:,}"))
    mem = r["memory"]
    rows += [(f"memory: {k.replace('_', ' ')}", gib(v)) for k, v in mem.items()]
    dm = r["device_memory"]
    rows.append(("device memory", f"{gib(dm['bytes'])} ({dm['source']})"))
    if dm.get("process_baseline"):
        rows.append(("  less the process's own (Python, PyTorch)", gib(dm["process_baseline"])))
    rows += [
             ("fits", "yes" if r["fits"] else "NO"),
             (f"largest batch (now {r['batch_size']})", str(r["largest_batch"]["plain"])),
             ("largest batch, activation checkpointing", str(r["largest_batch"]["activation_checkpointing"]))]
    if r.get("time"):
        rows.append(("time per step", f"{r['time']['seconds_per_step']:.3f} s ({r['time']['source']})"))
        if r["time"]["total_s"] is not None:
            total = r["time"]["total_s"]
            rows.append(("time of the run", f"{total / 3600:.2f} h" if total >= 3600 else f"{total:.0f} s"))
    rows += [(f"verify: batch {v['batch']}", f"peak {gib(v['peak'])}, {'fits' if v['fits'] else 'does not fit'}")
             for v in r.get("verify", [])]
    _render_rows([{"what": a, "value": b} for a, b in rows], ["what", "value"], False, {})


_RUN_COLUMNS = ["name", "state", "steps", "tokens_seen", "train_loss", "val_loss", "best_val_loss", "tasks",
                "tokens_per_s", "wall_s"]


def _render_runs(result: dict[str, Any], json_out: bool) -> None:
    """The runs table, then the config keys in which they differ (one row per key)."""
    if json_out:
        _print_json(_json_safe(result))
        return
    rows = [{**r, "tasks": ", ".join(f"{k} {v:.3f}" for k, v in r["tasks"].items()) if r.get("tasks") else None,
             "state": r["state"] + (f" ({r['signal']})" if r.get("signal") else ""),
             "tokens_per_s": round(r["tokens_per_s"]) if r.get("tokens_per_s") else None,
             "wall_s": f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else None} for r in result["runs"]]
    _render_rows(rows, _RUN_COLUMNS, False, {})
    names = [r["name"] for r in result["runs"]]
    diffs = [{"key": k, **{n: json.dumps(v.get(n), default=str) if n in v else "" for n in names}}
             for k, v in result["differences"].items()]
    if diffs:
        print()
        _render_rows(diffs, ["key", *names], False, {})
    if result.get("plot"):
        print(result["plot"])


# ---------------------------------------------------------------- loss


@app.command()
@_handle_errors
def loss(
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    data: DataOpt = None,
    seed: SeedOpt = None,
    eval_iter: EvalIterOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Windows per batch (default: the config's, 2).")] = None,
    device: DeviceOpt = None,
    sets: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Training and validation loss and perplexity (the book's calc_loss_loader)."""
    from gptcli.data import load_splits
    from gptcli.evaluate import split_losses
    from gptcli.resolve import build_model, check_data_path, resolve_model

    _refuse_training_keys(sets)
    plan = resolve_model(checkpoint, config, sets, {"train.device": device, "data.path": str(data) if data else None},
                         root=CHECKPOINTS_ROOT)
    _refuse_unused_seed(seed, plan.checkpoint)
    _notes(check_data_path(plan.cfg, "--data" if data else None))
    with Renderer() as renderer:
        splits = load_splits(plan.cfg.data, plan.cfg.model.context_length,
                             progress=corpus_download(renderer, plan.cfg.data.path))
    model, where = build_model(plan, seed)
    _notes(plan.notes)
    rows = split_losses(model, splits, batch_size or plan.cfg.train.batch_size, eval_iter, plan.cfg.data)
    if json_out:
        return _print_json({"model": where, "data": splits.source, **rows})
    # a mixture: each source's rows, then the split's weighed as training weighs them
    table = [(f"{split} ({source})", r) for source, by in rows.get("by_source", {}).items() for split, r in by.items()]
    table += [(split + (" (mixture, weighted)" if table else ""), rows[split]) for split in ("train", "val")]
    width = max(6, *(len(name) for name, _ in table))
    print(f"{'split':<{width}} {'loss':>10} {'perplexity':>12} {'tokens':>9} {'batches':>8}")
    for name, r in table:
        print(f"{name:<{width}} {r['loss']:>10.5f} {r['ppl']:>12.2f} {r['tokens']:>9d} {r['batches']:>8d}")


# ---------------------------------------------------------------- generate


class DecodePrecision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    int8 = "int8"


@app.command()
@_handle_errors
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="Text to continue; - reads it from stdin.")] = None,
    checkpoint: CheckpointOpt = None,
    config: ConfigOpt = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens to generate per sample (default: the config's train.max_new_tokens, 50).")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy; higher = more random.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Sample from the smallest set of tokens with probability >= p, in (0, 1].")] = None,
    eos: Annotated[bool, typer.Option("--eos/--no-eos", help="Stop a sample at <|endoftext|>.")] = True,
    num_samples: Annotated[int, typer.Option(min=1, help="Samples per prompt.")] = 1,
    prompts_file: Annotated[Optional[Path], typer.Option(help="One prompt per line, generated as one batch, printed in order.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the sampling draws (and of an untrained model); default: the config's train.seed.",
                                                callback=_checked(_check_seed))] = None,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Print tokens as they come (default: on a terminal; one sample only).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the whole context per token (the book's loop).")] = False,
    decode_precision: Annotated[DecodePrecision, typer.Option(help="fp32: exact (the book's tokens); bf16 or int8 (weight-only): faster, logits within a few % (README).")] = DecodePrecision.fp32,
    compile_decode: Annotated[bool, typer.Option("--compile-decode", help="torch.compile the one-token step over a static KV cache (GPU; compiling takes tens of seconds).")] = False,
    device: DeviceOpt = None,
    sets: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Continue a prompt (greedy by default, like the book's generate_text_simple)."""
    from gptcli.generate import check_sampling, complete
    from gptcli.resolve import load_model

    check_sampling(max_new_tokens or 0, temperature, top_k, top_p)  # before the (slow) model load
    if stream and json_out:
        raise InputError("--stream and --json: the JSON object is printed once the samples are complete; drop one")
    _refuse_unread_keys(sets, _GENERATE_KEYS, "generate")
    prompts = _read_prompts(prompt, prompts_file)
    model, plan, where = load_model(checkpoint, config, sets, {"train.device": device, "train.max_new_tokens": max_new_tokens},
                                    seed, root=CHECKPOINTS_ROOT)
    max_new_tokens = plan.cfg.train.max_new_tokens  # flag > --set > --config > checkpoint > default
    _notes(plan.notes)
    if plan.cfg.data.document_mask and any("<|endoftext|>" in p for p in prompts):
        _warn("the model was trained with data.document_mask: true, but generation attends across the "
              "<|endoftext|> in the prompt; give only the text after it to continue one document as trained")
    seed = plan.cfg.train.seed if seed is None else seed
    printer = _stream_printer(prompts, num_samples, stream, json_out)
    samples = complete(model, prompts, max_new_tokens, num_samples=num_samples, temperature=temperature, top_k=top_k,
                       top_p=top_p, eos=eos, use_cache=not no_cache, seed=seed, warn=_warn,
                       decode_precision=decode_precision.value, compile_decode=compile_decode,
                       on_tokens=printer.feed if printer else None)
    if printer is not None:
        printer.finish()
    elif json_out:
        _print_json({"model": where, "seed": seed, "samples": samples})
    else:
        print("\n\n".join(s["text"] for s in samples))


def _read_prompts(prompt: Optional[str], prompts_file: Optional[Path]) -> list[str]:
    """The prompt argument (`-`: all of stdin, less one final newline), then each non-blank line of --prompts-file."""
    prompt_is_stdin = prompt == "-"
    if prompt_is_stdin:
        try:
            prompt = sys.stdin.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"prompt -: cannot read stdin ({getattr(e, 'strerror', None) or 'not UTF-8 text'})") from None
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
        prompt = prompt[:-1] if prompt.endswith("\r") else prompt
    prompts = [] if prompt is None else [prompt]
    if prompts_file is not None:
        try:
            text = prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not UTF-8 text"
            raise InputError(f"--prompts-file {prompts_file}: cannot read ({reason})") from None
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise InputError(f"--prompts-file {prompts_file}: no prompts (one per line expected)")
        prompts += lines
    if not prompts or "" in prompts:
        raise InputError("prompt: empty; give the text to continue (or --prompts-file)")
    if prompt is not None:
        try:  # argv and a C-locale stdin carry bytes that are not UTF-8 as lone surrogates
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = prompt[e.start].encode("utf-8", "surrogateescape")
            raise InputError(f"prompt{' -' if prompt_is_stdin else ''}: not UTF-8 text "
                             f"(byte {byte!r} at character {e.start})") from None
    return prompts


def _stream_printer(prompts: list[str], num_samples: int, stream: Optional[bool], json_out: bool):
    """A `_StreamPrinter` when tokens are printed as they come: one sample, not --json; on a terminal by default."""
    live = (sys.stdout.isatty() if stream is None else stream) and not json_out
    n = len(prompts) * num_samples
    if live and n > 1:
        if stream:
            _err(f"warning: --stream shows one sample; the {n} samples print when done")
        return None
    return _StreamPrinter(prompts[0]) if live else None


class _StreamPrinter:
    """Writes the prompt, then each new token's text to stdout as soon as it forms whole characters."""

    def __init__(self, prompt: str):
        from gptcli.generate import TextStream

        self.text = TextStream()
        self._write(prompt)

    def feed(self, ids, running) -> None:
        if bool(running[0]):
            self._write(self.text.push(int(ids[0])))

    def finish(self) -> None:
        self._write(self.text.flush() + "\n")

    @staticmethod
    def _write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()


# ---------------------------------------------------------------- eval


@app.command("eval")
@_handle_errors
def eval_(
    checkpoint_arg: Annotated[Optional[Path], typer.Argument(metavar="CHECKPOINT", help="Deprecated: use --checkpoint.", hidden=True)] = None,
    checkpoint: CheckpointOpt = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Evaluate this file or folder too, as --data of train reads it; prepared shards: their validation split (repeatable).")] = None,
    val: Annotated[Optional[bool], typer.Option("--val/--no-val", help="Evaluate the config's validation split (default: yes; with --data only when its corpus is on disk).")] = None,
    all_checkpoints: Annotated[bool, typer.Option("--all", help="Every checkpoint of the run: loss against step.")] = False,
    text: Annotated[Optional[str], typer.Option(help="Score this text instead of datasets.")] = None,
    show_tokens: Annotated[bool, typer.Option("--show-tokens", help="With --text: each token's probability, rank and top-5 alternatives.")] = False,
    eval_iter: EvalIterOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Windows per batch (default: the config's).")] = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    sets: SetOpt = None,
    task: Annotated[Optional[str], typer.Option(help="Multiple-choice task instead of loss: hellaswag, or choices (your JSON Lines: context, choices, answer).")] = None,
    task_data: Annotated[Optional[Path], typer.Option(help="The task's JSON Lines file (default for hellaswag: data/hellaswag/hellaswag_val.jsonl).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate the first N items of the task.")] = None,
    per_item: Annotated[bool, typer.Option("--per-item", help="With --task --json: each choice's log-likelihood.")] = False,
    harness_task: Annotated[Optional[list[str]], typer.Option(help="Run this lm-evaluation-harness task on the model (repeatable; needs pip install 'gptcli[eval]').")] = None,
    harness_tasks_dir: Annotated[Optional[Path], typer.Option(help="A folder of lm-eval task YAML files for --harness-task.", parser=_existing("dir"), metavar="DIR")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Cross-entropy, perplexity and bits per byte of a checkpoint on its validation split and on files."""
    from gptcli import evaluate as ev
    from gptcli.resolve import build_model, eval_validation, resolve_model, run_or_newest, skipped_files_notes

    checkpoint = _eval_checkpoint(checkpoint_arg, checkpoint)
    files = [str(p) for p in data or []]
    _refuse_training_keys(sets)
    if task or harness_task or task_data or limit is not None or per_item or harness_tasks_dir:
        refused = {"--data": files, "--val/--no-val": val is not None, "--all": all_checkpoints, "--text": text,
                   "--show-tokens": show_tokens, "--eval-iter": eval_iter, "--batch-size": batch_size}
        return _eval_tasks(checkpoint, config, sets, seed, device, task, task_data, limit, per_item, harness_task,
                           harness_tasks_dir, json_out, [k for k, v in refused.items() if v])
    _check_eval_flags(files, val, all_checkpoints, text, show_tokens, config, sets, eval_iter, batch_size)
    if all_checkpoints:
        _refuse_unused_seed(seed, "each checkpoint of the run")
        run, notes = run_or_newest(checkpoint, CHECKPOINTS_ROOT)
        _notes(notes + skipped_files_notes(files))
        report = ev.evaluate_run(run, files, val is not False, eval_iter, batch_size, device)
        for reason in report["skipped"]:
            _err(f"warning: skipped a damaged checkpoint: {reason}")
        return _render_rows(report["results"], ["step", "checkpoint", "dataset", "loss", "ppl", "bpb", "tokens"],
                            json_out, {"run": report["run"], "skipped": report["skipped"]})
    plan = resolve_model(checkpoint, config, sets, {"train.device": device}, root=CHECKPOINTS_ROOT)
    _refuse_unused_seed(seed, plan.checkpoint)
    use_val, notes = eval_validation(plan.cfg, files, val, text is not None)
    _notes(notes)
    datasets = ev.eval_datasets(plan.cfg, files, use_val) if text is None else None  # bad data fails before the model loads
    model, where = build_model(plan, seed)
    _notes(plan.notes)
    if text is not None:
        result = ev.token_report(model, text, data=plan.cfg.data)
        return _print_json({"model": where, **result}) if json_out else _render_token_report(result, show_tokens)
    rows = ev.evaluate_datasets(model, datasets, batch_size or plan.cfg.train.batch_size, eval_iter, plan.cfg.data)
    _render_rows(rows, ["dataset", "loss", "ppl", "bpb", "tokens"], json_out, {"model": where})


# Keys of training's own loop that a flag of eval and loss stands for (README "Evaluate and sample").
_TRAINING_KEYS = {"train.eval_iter": "--eval-iter"}
# Keys only eval's loss reads (the batches, the corpus of the validation split): --task and --text refuse their
# flags (--batch-size, --data, --val), and so a --set of them.
_LOSS_ONLY_KEYS = ("train.batch_size", "data.path")


def _set_keys(sets: Optional[list[str]]) -> list[str]:
    """The dotted keys that --set items name, in order."""
    return [item.split("=", 1)[0].strip() for item in sets or []]


# The config keys generate reads (a section ends in "."): the model (an untrained one's shape, a checkpoint's keys
# are checked against it), where it runs and its seed, how many tokens, which run --config names, the mask's note.
_GENERATE_KEYS = ("model.", "train.device", "train.seed", "train.max_new_tokens", "train.out_dir", "data.document_mask")


def _refuse_unread_keys(sets: Optional[list[str]], read: tuple[str, ...], command: str) -> None:
    """Refuse a --set of a key `command` never reads: it would be dropped in silence (a config file may hold any)."""
    from gptcli.config import RENAMED_KEYS

    for key in _set_keys(sets):
        new = RENAMED_KEYS.get(key, key)  # an old spelling reads as its new one
        if not any(new == r or (r.endswith(".") and new.startswith(r)) for r in read):
            raise InputError(f"--set {key}: {command} does not read it (it reads {', '.join(read)}); drop it")


def _refuse_training_keys(sets: Optional[list[str]]) -> None:
    """Refuse a --set of a key eval and loss do not read: the config's value paces training's periodic evaluation."""
    for key in _set_keys(sets):
        if key in _TRAINING_KEYS:
            raise InputError(f"--set {key}: {key} is the training loop's estimate (batches per periodic evaluation), "
                             f"which this command does not read; use {_TRAINING_KEYS[key]} N (default: every batch)")


def _refuse_unused_seed(seed: Optional[int], checkpoint) -> None:
    """eval and loss draw nothing: --seed only seeds an untrained model's weights, so beside a checkpoint it is refused."""
    if seed is not None and checkpoint is not None:
        raise InputError(f"--seed: seeds the weights of an untrained model, but the weights come from {checkpoint} "
                         "and this command draws nothing at random; drop --seed")


def _eval_checkpoint(argument: Optional[Path], option: Optional[Path]) -> Optional[Path]:
    """eval's checkpoint: --checkpoint, or the deprecated positional argument (with a warning)."""
    if argument is None:
        return option
    if option is not None and argument != option:
        raise InputError("--checkpoint: give the checkpoint once (as --checkpoint; the argument is deprecated)")
    _err("warning: the CHECKPOINT argument of eval is deprecated; use --checkpoint CHECKPOINT")
    return argument


def _check_eval_flags(files, val, all_checkpoints, text, show_tokens, config, sets, eval_iter, batch_size) -> None:
    """Refuse eval's flag combinations that cannot all apply, naming them."""
    if show_tokens and text is None:
        raise InputError("--show-tokens: needs --text TEXT")
    if text is not None and (all_checkpoints or files):
        raise InputError("--text: cannot be combined with --all or --data")
    unused = {"--eval-iter": eval_iter is not None, "--batch-size": batch_size is not None, "--val/--no-val": val is not None}
    unused.update({f"--set {key}": True for key in _set_keys(sets) if key in _LOSS_ONLY_KEYS})
    if text is not None and any(unused.values()):
        flag = next(k for k, v in unused.items() if v)
        raise InputError(f"--text and {flag}: --text scores the text alone, in windows of the context (drop {flag})")
    if val is False and not files and text is None:
        raise InputError("--no-val: nothing left to evaluate; add --data FILE")
    if all_checkpoints and (config is not None or sets):
        raise InputError(f"--all and {'--config' if config is not None else '--set'}: --all evaluates each "
                         "checkpoint with its own saved config")


def _eval_tasks(checkpoint, config, sets, seed, device, task, task_data, limit, per_item, harness_task,
                harness_tasks_dir, json_out, refused) -> None:
    """gptcli eval --task / --harness-task: accuracy of multiple-choice tasks, GPT-2's figures beside."""
    from gptcli import tasks as tk

    refused += [f"--set {key}" for key in _set_keys(sets) if key in _LOSS_ONLY_KEYS]  # their flags' keys: refused alike
    if refused:
        raise InputError(f"{refused[0]}: does not apply to --task/--harness-task (they score tasks, not loss)")
    if not task and not harness_task:
        raise InputError("--task-data/--limit/--per-item/--harness-tasks-dir: need --task NAME or --harness-task NAME")
    if (task_data or per_item) and not task:
        raise InputError(f"{'--task-data' if task_data else '--per-item'}: needs --task NAME")
    if per_item and not json_out:
        raise InputError("--per-item: the log-likelihoods are part of the --json output; add --json")
    if harness_tasks_dir and not harness_task:
        raise InputError("--harness-tasks-dir: needs --harness-task NAME")
    loaded = tk.load_task(task, task_data, limit) if task else None  # bad input fails before the model loads
    if loaded is not None and task_data is None:  # the tool chose the file: say which
        _err(f"task data: {loaded.path} (the default of --task {task}; --task-data chooses another)")
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}: must be at least 1")
    if harness_task:
        from gptcli import harness  # InputError naming pip install 'gptcli[eval]' without the extra
    from gptcli.documents import as_trained
    from gptcli.resolve import build_model, resolve_model

    plan = resolve_model(checkpoint, config, sets, {"train.device": device}, root=CHECKPOINTS_ROOT)
    _refuse_unused_seed(seed, plan.checkpoint)
    model, where = build_model(plan, seed)
    _notes(plan.notes)
    results = {}
    if loaded is not None:
        results[task] = tk.evaluate_task(as_trained(model, plan.cfg.data), loaded, per_item=per_item)
    if harness_task:
        results.update(harness.run_harness(model, harness_task, harness_tasks_dir, limit, data=plan.cfg.data))
    if json_out:
        _print_json({"model": where, "tasks": results})
        return
    for name, r in results.items():
        print(f"{name}: acc {_with_stderr(r, 'acc')} · acc_norm {_with_stderr(r, 'acc_norm')} · {r.get('items')} items")
        for b in (r.get("baseline") or {}).values():
            print(f"  {b['model']} ({b['method']}, {b['items']} items): acc {b['acc']:.4f} · acc_norm {b['acc_norm']:.4f}")


def _with_stderr(r: dict[str, Any], metric: str) -> str:
    se = r.get(f"{metric}_stderr")
    return _fmt(r.get(metric)) + (f" ± {se:.4f}" if isinstance(se, float) else "")


_HEADERS = {"ppl": "perplexity", "bpb": "bits/byte", "tokens_seen": "tokens", "train_loss": "train loss", "val_loss": "val loss",
            "best_val_loss": "best val loss", "tokens_per_s": "tokens/s", "wall_s": "wall s"}


def _render_rows(rows: list[dict[str, Any]], columns: list[str], json_out: bool, extra: dict[str, Any]) -> None:
    if json_out:
        _print_json({**extra, "results": rows})
        return
    from rich.table import Table

    table = Table(*[_HEADERS.get(c, c) for c in columns], box=None, pad_edge=False)
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in columns])
    _stdout_console().print(table)


def _stdout_console():
    """Rich output for stdout: fitted to a terminal; unwrapped, untruncated lines into a pipe or file."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.5f}" if abs(x) < 1e4 else f"{x:.4g}"
    return "" if x is None else str(x)


def _prob(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def _render_token_report(result: dict[str, Any], show_tokens: bool) -> None:
    """The chapter's target-probability table, coloured green (likely) to red (unlikely)."""
    from rich.table import Table
    from rich.text import Text

    console = _stdout_console()
    if show_tokens:
        table = Table("pos", "token", "p(token)", "rank", "top-5 alternatives", box=None, pad_edge=False)
        for t in result["tokens"]:
            if t["prob"] is None:  # the first token is context only
                table.add_row(str(t["pos"]), repr(t["token"]), "", "", "")
                continue
            colour = "green" if t["prob"] >= 0.5 else "yellow" if t["prob"] >= 0.05 else "red"
            alts = ", ".join(f"{a['token']!r} {_prob(a['prob'])}" for a in t["top"])
            table.add_row(str(t["pos"]), Text(repr(t["token"]), style=colour), Text(_prob(t["prob"]), style=colour),
                          str(t["rank"]), alts)
        console.print(table)
    console.print(f"loss {result['loss']:.5f} · perplexity {result['ppl']:.2f} · "
                  f"bits/byte {result['bpb']:.4f} · {result['tokens_predicted']} predicted tokens", markup=False)


# ---------------------------------------------------------------- pretrained weights

PRETRAINED_ROOT = CHECKPOINTS_ROOT / "pretrained"


class WeightSource(str, Enum):
    hf = "hf"
    openai = "openai"


class ExportFormat(str, Enum):
    hf = "hf"


@app.command("download")
@_handle_errors
def download_(
    name: Annotated[str, typer.Argument(help="gpt2-small, gpt2-medium, gpt2-large or gpt2-xl (124M to 1558M); hellaswag: the task's validation file.")],
    source: Annotated[WeightSource, typer.Option(help="hf: the Hugging Face hub; openai: OpenAI's TensorFlow files.")] = WeightSource.hf,
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: checkpoints/pretrained/NAME; hellaswag: data/hellaswag).")] = None,
    revision: Annotated[str, typer.Option(help="Hub branch, tag or commit (--source hf).")] = "main",
    endpoint: Annotated[Optional[str], typer.Option(help="Base URL of a mirror (default: $HF_ENDPOINT or the hub; OpenAI's storage).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Download and convert again into an existing directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Download OpenAI's GPT-2 weights, verify them and convert them into a gptcli checkpoint (or: hellaswag, the task's validation file)."""
    from gptcli.hub import download_pretrained

    if name == "hellaswag":
        return _download_hellaswag(source, out, revision, endpoint, overwrite, json_out)
    if source != WeightSource.hf and revision != "main":
        raise InputError("--revision: a Hugging Face hub revision; it does not apply to --source openai (one fixed release)")
    with Renderer() as renderer:
        result = download_pretrained(name, out or PRETRAINED_ROOT / name, source=source.value, revision=revision,
                                     endpoint=endpoint, overwrite=overwrite, progress=download_progress(renderer))
    if not result["downloaded"]:
        _err(f"{result['checkpoint']}: already downloaded (--overwrite fetches it again)")
    if json_out:
        _print_json(result)
    else:
        print(result["checkpoint"])


def _download_hellaswag(source, out, revision, endpoint, overwrite, json_out) -> None:
    from gptcli.tasks import download_hellaswag

    if source != WeightSource.hf or revision != "main" or overwrite:
        flag = "--source" if source != WeightSource.hf else "--revision" if revision != "main" else "--overwrite"
        raise InputError(f"{flag}: does not apply to hellaswag (one pinned file, kept once verified)")
    with Renderer() as renderer:
        result = download_hellaswag(out, endpoint=endpoint, progress=download_progress(renderer))
    if not result["downloaded"]:
        _err(f"{result['path']}: already downloaded and verified")
    _print_json(result) if json_out else print(result["path"])


@app.command("import")
@_handle_errors
def import_(
    path: Annotated[Path, typer.Argument(help="A Hugging Face GPT-2 directory, an OpenAI checkpoint directory or a book .pth file.")],
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: checkpoints/pretrained/<PATH's name>).")] = None,
    n_heads: Annotated[Optional[int], typer.Option(min=1, help="Attention heads of a book .pth whose width is not GPT-2's.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier import there (a folder holding anything else is refused).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert local GPT-2 weights into a gptcli checkpoint (OpenAI's files are read without TensorFlow)."""
    from gptcli.checkpoint import named_dir
    from gptcli.weights import import_weights, save_imported

    imported = import_weights(path, n_heads)
    target = out or named_dir(PRETRAINED_ROOT, imported.name, f"{path}: model name")
    saved = save_imported(imported, target, imported.name, overwrite)
    if json_out:
        _print_json({"checkpoint": saved, "source": imported.source, "model": imported.config.to_dict()["model"]})
    else:
        print(saved)


@app.command("export")
@_handle_errors
def export_(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint or run directory (a run exports its newest valid step).")],
    out: Annotated[Path, typer.Argument(help="Directory to write.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="hf: a Hugging Face GPT-2 directory.")] = ExportFormat.hf,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export there (a folder holding anything else is refused).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Export a checkpoint for other tools (hf: config.json, model.safetensors and GPT-2's tokenizer files)."""
    from gptcli.checkpoint import load_checkpoint
    from gptcli.resolve import checkpoint_note
    from gptcli.weights import check_export_target, export_hf

    check_export_target(out, overwrite)  # before the weights are read
    ckpt = load_checkpoint(checkpoint)  # a run: its newest step that verifies, loaded while training may prune
    if note := checkpoint_note(checkpoint, ckpt.path, ckpt.skipped):
        _err(note)
    exporters = {ExportFormat.hf: export_hf}
    written = exporters[fmt](ckpt, out, overwrite)
    if json_out:  # the checkpoint exported: a run's newest step that verifies
        _print_json({"out": written, "checkpoint": ckpt.path, "format": fmt.value})
    else:
        print(written)


# ---------------------------------------------------------------- prepare


class SplitDocs(str, Enum):
    none = "none"
    blank_lines = "blank-lines"
    endoftext = "endoftext"


@app.command()
@_handle_errors
def prepare(
    inputs: Annotated[list[Path], typer.Argument(help="Text files (.txt, .txt.gz), JSON Lines (.jsonl, .jsonl.gz), Parquet (.parquet), folders or globs of them, or Hugging Face datasets (hf:NAME[:CONFIG], hf:DIR).")],
    out: Annotated[Path, typer.Option(help="Output directory, e.g. data/NAME; a rerun keeps its finished shards.")],
    workers: Annotated[Optional[int], typer.Option(min=1, help="Tokenizer threads (default: the number of CPUs).")] = None,
    val_ratio: Annotated[float, typer.Option(help="Fraction of documents (chosen by hash) for validation, in [0, 1).")] = 0.01,
    shard_mb: Annotated[float, typer.Option(min=0.001, help="Input megabytes per shard.")] = 64.0,
    field: Annotated[str, typer.Option(help="The JSON Lines field, Parquet or dataset column that holds the text.")] = "text",
    split_docs: Annotated[SplitDocs, typer.Option(help="Cut text files into documents: at blank lines, or at lines holding only <|endoftext|> (default: a text file is one document).")] = SplitDocs.none,
    split: Annotated[Optional[str], typer.Option(help="The split of hf: datasets to read, e.g. train.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Tokenize a corpus into uint16 (uint32 for vocabularies beyond 65,536) token shards with a document-level train/validation split."""
    from gptcli.shards import empty_split_warnings, prepare as run_prepare, skipped_note

    with PrepareProgress() as progress:
        result = run_prepare(inputs, out, workers=workers, val_ratio=val_ratio, shard_mb=shard_mb, field=field,
                             split_docs=split_docs.value, split=split, progress=progress)
    splits = result.index["splits"]
    summary = {"out": str(out), "pieces_done": result.pieces_done, "pieces_kept": result.pieces_kept,
               **{f"{s}_{k}": splits[s][k] for s in ("train", "val") for k in ("tokens", "documents")},
               "shards": sum(len(splits[s]["shards"]) for s in ("train", "val")), "elapsed_s": result.elapsed_s}
    rate = f" ({result.tokens_done / max(result.elapsed_s, 1e-9):,.0f} tokens/s tokenized)" if result.tokens_done else ""
    _err(f"{summary['train_tokens']:,} training tokens ({summary['train_documents']:,} documents), "
         f"{summary['val_tokens']:,} validation tokens ({summary['val_documents']:,} documents) in "
         f"{summary['shards']} shards in {result.elapsed_s:.1f} s{rate}; "
         f"{result.pieces_kept} finished piece(s) kept")
    if result.skipped:
        _warn(skipped_note(result.skipped))
    for warning in empty_split_warnings(result.index):
        _warn(warning)
    if json_out:
        _print_json(summary)
    else:
        print(out)


def main() -> None:  # python -m gptcli
    app()

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
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

try:  # recent Typer vendors its own click; its usage exceptions are the ones raised
    from typer import _click as click
except ImportError:  # pragma: no cover - older Typer uses click itself
    import click

from gptcli.errors import GptcliError, InputError, first_line


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


app = typer.Typer(
    cls=_OneLineErrors,
    help="Pretrain, evaluate and sample GPT models from scratch (the book's chapter 5, as a tool).",
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
)
_state = {"debug": bool(os.environ.get("GPTCLI_DEBUG"))}


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
) -> None:
    """Pretrain, evaluate and sample GPT models from scratch."""
    _state["debug"] = _state["debug"] or debug


def _err(message: str) -> None:
    """One plain line on stderr (no markup, no wrapping)."""
    print(message, file=sys.stderr, flush=True)


def _handle_errors(fn):
    """Turn library exceptions into one line on stderr and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except _OutputFailed as e:
            raise typer.Exit(_output_failed(e)) from None
        except GptcliError as e:
            if _state["debug"]:
                raise
            _err(f"error: {e}")
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


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_json_default, allow_nan=False))


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

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config (default: the book's GPT-2 124M, context 256).",
                 exists=True, dir_okay=False, readable=True),
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
            except InputError as e:
                raise typer.BadParameter(str(e)) from None
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

CHECKPOINTS_ROOT = Path("checkpoints")


def _notes(plan):
    """Say on stderr, one line each, what the tool chose by itself; return the plan."""
    for note in plan.notes:
        _err(note)
    return plan


def _model_for(checkpoint, config, sets, seed, device):
    """(model, cfg, description) in one step, for commands that read no data first."""
    from gptcli.resolve import build_model, resolve_model

    plan = resolve_model(checkpoint, config, sets, {"train.device": device}, root=CHECKPOINTS_ROOT)
    model, where = build_model(plan, seed)
    _notes(plan)
    return model, plan.cfg, where


# ---------------------------------------------------------------- train


class _TrainEvents:
    """Renders training progress on stderr: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, notes: tuple[str, ...] = (), corpus: Optional[str] = None):
        from gptcli.train import Events

        self.notes = list(notes)  # the choices the tool made, said once the inputs checked out
        self.corpus = corpus
        self._base = Events
        self.console = _stderr_console()
        self.tty = sys.stderr.isatty()
        self.progress = None
        self.task = None
        self.total = 0
        self.last_val = None

    def download(self, done: int, total: Optional[int]) -> None:
        if self.corpus is not None:  # once: where the default corpus goes
            _err(f"downloading the book's corpus to {self.corpus} (data.path)")
            self.corpus = None
        if self.tty:
            pct = f"{100 * done / total:5.1f}%" if total else f"{done} bytes"
            print(f"\rdownloading the-verdict.txt {pct}", end="", file=sys.stderr, flush=True)
            if total and done >= total:
                print(file=sys.stderr)

    def start(self, info: dict[str, Any]) -> None:
        for note in self.notes:
            _err(note)
        self.total = info["total_steps"]
        what = "resuming" if info["resumed"] else "training"
        _err(f"{what} {info['params'] / 1e6:.1f}M parameters on {info['device']}"
             f"{' x' + str(info['world_size']) if info['world_size'] > 1 else ''}: "
             f"{info['train_tokens']} training / {info['val_tokens']} validation tokens, "
             f"{info['total_steps']} steps -> {info['run_dir']}")
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=info["step"], status="")

    def log(self, r: dict[str, Any]) -> None:
        mfu = f" · MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
        val = f" · val {self.last_val:.3f}" if self.last_val is not None else ""
        status = (f"epoch {r['epoch']} · loss {r['loss']:.3f}{val} · lr {r['lr']:.2e} · "
                  f"{r['tokens_per_s']:,.0f} tok/s{mfu}")
        if self.progress is not None:
            self.progress.update(self.task, completed=r["step"], status=status)
        else:
            _err(f"step {r['step']}/{self.total} · {status}")

    def eval(self, r: dict[str, Any]) -> None:
        self.last_val = r["val_loss"]
        # The book's line; its step counter starts at 0 for the first optimizer step. The book
        # has no evaluation of the final weights: that line says "End" instead of "Ep N".
        where = f"End (Ep {r['epoch']}, " if r.get("final") else f"Ep {r['epoch']} ("
        self._line(f"{where}Step {r['step'] - 1:06d}): "
                   f"Train loss {r['train_loss']:.3f}, Val loss {r['val_loss']:.3f}")

    def sample(self, epoch: int, text: str) -> None:
        self._line(text)

    def checkpoint(self, path: Path) -> None:
        if self.progress is None:
            _err(f"saved {path}")

    def warn(self, message: str) -> None:
        self._line(f"warning: {message}")

    def _line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            _err(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


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
    if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_with_torchrun(nproc)
    from gptcli.resolve import check_data_path, resolve_train
    from gptcli.train import train as run_training

    overrides = {"data.path": str(data) if data else None, "train.device": device, "train.num_epochs": num_epochs,
                 "train.max_steps": max_steps, "train.max_tokens": max_tokens, "train.batch_size": batch_size,
                 "train.learning_rate": learning_rate, "train.seed": seed}
    if allow_data_change and not resume:
        raise InputError("--allow-data-change: only with --resume (a new run takes any corpus)")
    events = _NoEvents()
    try:  # resolution errors too: under torchrun every rank meets them, and rank 0 alone reports them
        plan = resolve_train(config, sets, overrides, out=out, name=name, resume=resume, overwrite=overwrite,
                             init_from=init_from, root=CHECKPOINTS_ROOT)
        check_data_path(plan.cfg, "--data" if data else None)
        cfg, run_dir = plan.cfg, plan.run_dir
        resume, overwrite = plan.mode == "resume", plan.mode in ("overwrite", "restart")
        if os.environ.get("RANK", "0") == "0":
            events = _TrainEvents(plan.notes, cfg.data.path)
        summary = run_training(cfg, run_dir, resume=resume, overwrite=overwrite, init_from=init_from, events=events,
                               allow_data_change=allow_data_change)
    except GptcliError as e:
        events.close()
        # Under torchrun every rank meets the same bad input or interruption: rank 0 reports it.
        other_rank = os.environ.get("RANK", "0") != "0" and (isinstance(e, InputError) or hasattr(e, "checkpoint"))
        if hasattr(e, "checkpoint") or other_rank:  # Interrupted: the checkpoint is saved, say how to go on
            if not other_rank:
                _err(str(e))
            raise typer.Exit(e.exit_code) from None
        raise
    events.close()
    if os.environ.get("RANK", "0") != "0":
        return
    if json_out:
        _print_json(_json_safe(summary))
    else:
        print(summary["checkpoint"])


class _NoEvents:
    """The progress of ranks other than 0: rank 0 speaks for all of them."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _relaunch_with_torchrun(nproc: int) -> None:
    """Run `torchrun --standalone --nproc_per_node=N -m gptcli <same args without --nproc>`, exit with its status.

    torchrun's own argument parser and launcher (``torch.distributed.run``) start
    the processes; a failing process's exit code (2 for bad input, 130/143 when
    interrupted) becomes ours instead of torchrun's generic 1 and error report.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    import logging

    # torchrun pins each process to 1 thread (and says so in a banner); share the CPUs instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the processes report their own errors
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        args.append(a)
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "gptcli", *args]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: it could not say so itself
            _err(f"error: rank {rank} was killed by {failure.signal_name()}")
            raise typer.Exit(128 - failure.exitcode) from None
        raise typer.Exit(failure.exitcode) from None
    except SignalException as e:
        raise typer.Exit(128 + int(e.sigval)) from None
    raise typer.Exit(0)


@app.command()
@_handle_errors
def plot(run: Annotated[Path, typer.Argument(help="Run directory holding metrics.jsonl.")]) -> None:
    """Redraw losses.png and metrics.csv of a run from its metrics.jsonl."""
    from gptcli import report

    if not (run / report.METRICS).is_file():
        raise InputError(f"{run}: no {report.METRICS} (not a run directory?)")
    paths = report.render(run)
    print(paths["plot"])


# ---------------------------------------------------------------- loss


@app.command()
@_handle_errors
def loss(
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    data: DataOpt = None,
    seed: SeedOpt = None,
    num_batches: Annotated[Optional[int], typer.Option(min=1, help="At most this many batches per split.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Windows per batch (default: the config's, 2).")] = None,
    device: DeviceOpt = None,
    sets: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Training and validation loss and perplexity (the book's calc_loss_loader)."""
    from gptcli.data import load_splits, make_loader
    from gptcli.device import resolve_device
    from gptcli.evaluate import evaluate_loss

    from gptcli.resolve import build_model, check_data_path, resolve_model

    plan = resolve_model(checkpoint, config, sets, {"train.device": device, "data.path": str(data) if data else None},
                         root=CHECKPOINTS_ROOT)
    cfg = plan.cfg
    check_data_path(cfg, "--data" if data else None)
    splits = load_splits(cfg.data, cfg.model.context_length, progress=_TrainEvents(corpus=cfg.data.path).download)
    model, where = build_model(plan, seed)
    _notes(plan)
    bs = batch_size or cfg.train.batch_size
    dev = resolve_device(cfg.train.device)
    rows = {}
    # The book's loaders: training drops its last partial batch, validation keeps it. In order,
    # so --num-batches picks the same batches every time.
    for name, windows, drop_last in (("train", splits.train, True), ("val", splits.val, False)):
        loader = make_loader(windows, bs, shuffle=False, drop_last=drop_last)
        rows[name] = evaluate_loss(model, loader, dev, num_batches, split=name)
    if json_out:
        _print_json(_json_safe({"model": where, "data": splits.source, **rows}))
        return
    print(f"{'split':<6} {'loss':>10} {'perplexity':>12} {'tokens':>9} {'batches':>8}")
    for name, r in rows.items():
        print(f"{name:<6} {r['loss']:>10.5f} {r['ppl']:>12.2f} {r['tokens']:>9d} {r['batches']:>8d}")


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
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per sample.")] = 50,
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
    import torch

    from gptcli.generate import check_sampling, generate as run_generate, lower_precision_for_decoding, optimize_for_decoding
    from gptcli.tokenizer import END_OF_TEXT_ID, decode, encode

    check_sampling(max_new_tokens, temperature, top_k, top_p)  # before the (slow) model load
    prompts = _read_prompts(prompt, prompts_file)
    if num_samples > 1 and temperature == 0.0:
        _err(f"warning: --num-samples {num_samples} with greedy decoding (--temperature 0) gives {num_samples} "
             f"identical samples; give a temperature > 0 to sample")
    model, cfg, where = _model_for(checkpoint, config, sets, seed, device)
    ids = [encode(p) for p in prompts for _ in range(num_samples)]
    context = cfg.model.context_length
    for i, p in enumerate(prompts):
        n = len(ids[i * num_samples])
        if n > context:
            which = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
            _err(f"warning: {which} has {n} tokens, the context {context}: its first {n - context} tokens are "
                 f"dropped and it continues from its last {context}")
    model = optimize_for_decoding(lower_precision_for_decoding(model, decode_precision.value), len(ids))
    seed = cfg.train.seed if seed is None else seed
    torch.manual_seed(seed)  # the book seeds right before it samples
    live = (sys.stdout.isatty() if stream is None else stream) and not json_out
    if live and len(ids) > 1:
        live = False
        if stream:
            _err(f"warning: --stream shows one sample; the {len(ids)} samples print when done")
    printer = _StreamPrinter(prompts[0]) if live else None
    outs = run_generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_id=END_OF_TEXT_ID if eos else None, use_cache=not no_cache,
                        on_tokens=printer.feed if printer else None, compile_decode=compile_decode)
    texts = [p + decode(o) for p, o in zip((p for p in prompts for _ in range(num_samples)), outs)]
    if printer is not None:
        printer.finish()
    elif json_out:
        samples = [{"prompt": prompts[i // num_samples], "sample": i % num_samples, "text": t, "completion": decode(o),
                    "ids": o, "new_tokens": len(o), "finish": "eos" if len(o) < max_new_tokens else "length"}
                   for i, (t, o) in enumerate(zip(texts, outs))]
        _print_json({"model": where, "seed": seed, "samples": samples})
    else:
        print("\n\n".join(texts))


def _read_prompts(prompt: Optional[str], prompts_file: Optional[Path]) -> list[str]:
    """The prompt argument (`-`: all of stdin, less one final newline), then each non-blank line of --prompts-file."""
    if prompt == "-":
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
    return prompts


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
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint or run directory (default: the newest).")] = None,
    checkpoint_opt: CheckpointOpt = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Evaluate this file or folder too, as --data of train reads it; prepared shards: their validation split (repeatable).")] = None,
    val: Annotated[Optional[bool], typer.Option("--val/--no-val", help="Evaluate the config's validation split (default: yes; with --data only when its corpus is on disk).")] = None,
    all_checkpoints: Annotated[bool, typer.Option("--all", help="Every checkpoint of the run: loss against step.")] = False,
    text: Annotated[Optional[str], typer.Option(help="Score this text instead of datasets.")] = None,
    show_tokens: Annotated[bool, typer.Option("--show-tokens", help="With --text: each token's probability, rank and top-5 alternatives.")] = False,
    num_batches: Annotated[Optional[int], typer.Option(min=1, help="At most this many batches per dataset.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Windows per batch (default: the config's).")] = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    sets: SetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cross-entropy, perplexity and bits per byte of a checkpoint on its validation split and on files."""
    from gptcli import evaluate as ev

    files = [str(p) for p in data or []]
    if checkpoint is not None and checkpoint_opt is not None and checkpoint != checkpoint_opt:
        raise InputError("--checkpoint: give the checkpoint once (as the argument or as --checkpoint)")
    checkpoint = checkpoint or checkpoint_opt
    if show_tokens and text is None:
        raise InputError("--show-tokens: needs --text TEXT")
    if text is not None and (all_checkpoints or files):
        raise InputError("--text: cannot be combined with --all or --data")
    if val is False and not files and text is None:
        raise InputError("--no-val: nothing left to evaluate; add --data FILE")
    if all_checkpoints:
        if config is not None or sets:
            raise InputError(f"--all and {'--config' if config is not None else '--set'}: --all evaluates each "
                             "checkpoint with its own saved config")
        if checkpoint is None:
            from gptcli.resolve import newest_run

            checkpoint, note = newest_run(CHECKPOINTS_ROOT)
            _err(note)
        report = ev.evaluate_run(checkpoint, files, val is not False, num_batches, batch_size, device)
        for reason in report["skipped"]:
            _err(f"warning: skipped a damaged checkpoint: {reason}")
        columns = ["step", "checkpoint", "dataset", "loss", "ppl", "bpb", "tokens"]
        _render_rows(report["results"], columns, json_out, {"run": report["run"], "skipped": report["skipped"]})
        return
    from gptcli.resolve import build_model, check_data_path, corpus_available, describe_origin, resolve_model

    plan = resolve_model(checkpoint, config, sets, {"train.device": device}, root=CHECKPOINTS_ROOT)
    cfg = plan.cfg
    if val is None and files and text is None and not corpus_available(cfg):
        val = False  # --data files never trigger a download of the model's corpus
        _err(f"validation split skipped: its corpus {cfg.data.path} (data.path from "
             f"{describe_origin(cfg, 'data.path')}) is not on disk; --val evaluates it (downloading the default corpus)")
    if val is not False and text is None:
        check_data_path(cfg)
    datasets = ev.eval_datasets(cfg, files, val is not False) if text is None else None  # bad data fails before the model loads
    model, where = build_model(plan, seed)
    _notes(plan)
    if text is not None:
        result = ev.token_report(model, text)
        if json_out:
            _print_json(_json_safe({"model": where, **result}))
        else:
            _render_token_report(result, show_tokens)
        return
    rows = ev.evaluate_datasets(model, datasets, batch_size or cfg.train.batch_size, num_batches)
    _render_rows(rows, ["dataset", "loss", "ppl", "bpb", "tokens"], json_out, {"model": where})


_HEADERS = {"ppl": "perplexity", "bpb": "bits/byte"}


def _render_rows(rows: list[dict[str, Any]], columns: list[str], json_out: bool, extra: dict[str, Any]) -> None:
    if json_out:
        _print_json(_json_safe({**extra, "results": rows}))
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


class _DownloadProgress:
    """Download progress on stderr: a rich bar per file on a terminal, one line per file otherwise."""

    def __init__(self):
        self.progress = None
        self.tasks: dict[str, Any] = {}

    def __call__(self, label: str, done: int, total: Optional[int]) -> None:
        if not sys.stderr.isatty():
            if label not in self.tasks:
                self.tasks[label] = None
                _err(f"downloading {label}" + (f" ({total:,} bytes)" if total else ""))
            return
        if self.progress is None:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     TransferSpeedColumn(), TimeRemainingColumn(), console=_stderr_console())
            self.progress.start()
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total)
        self.progress.update(self.tasks[label], completed=done, total=total)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@app.command("download")
@_handle_errors
def download_(
    name: Annotated[str, typer.Argument(help="gpt2-small, gpt2-medium, gpt2-large or gpt2-xl (124M to 1558M).")],
    source: Annotated[WeightSource, typer.Option(help="hf: the Hugging Face hub; openai: OpenAI's TensorFlow files.")] = WeightSource.hf,
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: checkpoints/pretrained/NAME).")] = None,
    revision: Annotated[str, typer.Option(help="Hub branch, tag or commit (--source hf).")] = "main",
    endpoint: Annotated[Optional[str], typer.Option(help="Base URL of a mirror (default: $HF_ENDPOINT or the hub; OpenAI's storage).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Download and convert again into an existing directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Download OpenAI's GPT-2 weights, verify them and convert them into a gptcli checkpoint."""
    from gptcli.weights import download_pretrained

    progress = _DownloadProgress()
    try:
        result = download_pretrained(name, out or PRETRAINED_ROOT / name, source=source.value, revision=revision,
                                     endpoint=endpoint, overwrite=overwrite, progress=progress)
    finally:
        progress.close()
    if not result["downloaded"]:
        _err(f"{result['checkpoint']}: already downloaded (--overwrite fetches it again)")
    if json_out:
        _print_json(result)
    else:
        print(result["checkpoint"])


@app.command("import")
@_handle_errors
def import_(
    path: Annotated[Path, typer.Argument(help="A Hugging Face GPT-2 directory, an OpenAI checkpoint directory or a book .pth file.")],
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: checkpoints/pretrained/<PATH's name>).")] = None,
    n_heads: Annotated[Optional[int], typer.Option(min=1, help="Attention heads of a book .pth whose width is not GPT-2's.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing directory.")] = False,
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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing directory.")] = False,
) -> None:
    """Export a checkpoint for other tools (hf: config.json, model.safetensors and GPT-2's tokenizer files)."""
    from gptcli.weights import export_hf

    exporters = {ExportFormat.hf: export_hf}
    print(exporters[fmt](checkpoint, out, overwrite))


# ---------------------------------------------------------------- prepare


class _PrepareProgress:
    """Renders prepare progress on stderr: input MB/s and tokens/s (one updating line on a terminal)."""

    def __init__(self):
        import time

        self.clock = time.perf_counter
        self.tty = sys.stderr.isatty()
        self.start = self.mark = (self.clock(), 0, 0)  # (time, bytes, tokens) at the start, at the last line
        self.shown = self.finished = False

    def __call__(self, done: int, total: int, tokens: int) -> None:
        now = self.clock()
        if self.finished or (now - self.mark[0] < (0.5 if self.tty else 10.0) and done < total):
            return
        self.finished = done >= total
        if self.finished and not self.tty:
            return  # plain mode: the command's summary line reports the whole run
        t0, bytes0, tokens0 = self.start if self.finished else self.mark  # the last line: whole-run rates
        dt = max(now - t0, 1e-9)
        fraction = done / max(total, 1)
        line = (f"prepare {100 * fraction:5.1f}% · {done / 1e6:,.1f}/{total / 1e6:,.1f} MB · "
                f"{(done - bytes0) / dt / 1e6:,.1f} MB/s · {(tokens - tokens0) / dt:,.0f} tokens/s")
        self.mark = (now, done, tokens)
        if self.tty:
            bar = "█" * round(24 * fraction) + "░" * (24 - round(24 * fraction))
            print(f"\r{bar} {line}\x1b[K", end="", file=sys.stderr, flush=True)
            self.shown = True
        else:
            _err(line)

    def close(self) -> None:
        if self.shown:
            print(file=sys.stderr, flush=True)


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
    val_ratio: Annotated[float, typer.Option(min=0.0, max=0.5, help="Fraction of documents (chosen by hash) for validation.")] = 0.01,
    shard_mb: Annotated[float, typer.Option(min=0.001, help="Input megabytes per shard.")] = 64.0,
    field: Annotated[str, typer.Option(help="The JSON Lines field, Parquet or dataset column that holds the text.")] = "text",
    split_docs: Annotated[SplitDocs, typer.Option(help="Cut text files into documents: at blank lines, or at lines holding only <|endoftext|> (default: a text file is one document).")] = SplitDocs.none,
    split: Annotated[Optional[str], typer.Option(help="The split of hf: datasets to read, e.g. train.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Tokenize a corpus into uint16 (uint32 for vocabularies beyond 65,536) token shards with a document-level train/validation split."""
    from gptcli.shards import empty_split_warnings, prepare as run_prepare

    render = _PrepareProgress()
    try:
        result = run_prepare(inputs, out, workers=workers, val_ratio=val_ratio, shard_mb=shard_mb, field=field,
                             split_docs=split_docs.value, split=split, progress=render)
    finally:
        render.close()
    splits = result.index["splits"]
    summary = {"out": str(out), "pieces_done": result.pieces_done, "pieces_kept": result.pieces_kept,
               **{f"{s}_{k}": splits[s][k] for s in ("train", "val") for k in ("tokens", "documents")},
               "shards": sum(len(splits[s]["shards"]) for s in ("train", "val")), "elapsed_s": result.elapsed_s}
    _err(f"{summary['train_tokens']:,} training tokens ({summary['train_documents']:,} documents), "
         f"{summary['val_tokens']:,} validation tokens ({summary['val_documents']:,} documents) in "
         f"{summary['shards']} shards in {result.elapsed_s:.1f} s "
         f"({(summary['train_tokens'] + summary['val_tokens']) / max(result.elapsed_s, 1e-9):,.0f} tokens/s); "
         f"{result.pieces_kept} finished piece(s) kept")
    for warning in empty_split_warnings(result.index):
        _err(f"warning: {warning}")
    if json_out:
        _print_json(summary)
    else:
        print(out)


def main() -> None:  # python -m gptcli
    app()

"""gptcli train: the book's ``train_model_simple``, made durable, resumable and fast.

The loop (``_loop``) reads top to bottom over one ``TrainState`` (what a checkpoint
stores): learning rate -> ``accumulate`` (micro-batches; gradients reduced across
processes on the last one only) -> ``optimizer_step`` (non-finite check, clip, step)
-> log -> ``evaluate`` -> ``sample`` (after each epoch) -> ``save`` -> stop checks.
``build`` and ``restore`` prepare it; each stage is a module function. Components that
own state live beside the loop: ``metrics.Metrics`` (records and their sinks),
``rundir`` (lock, run.json, stop signals), ``checkpoint`` (durable checkpoints).

Book-exact runs. With the reference config on CPU the printed losses and samples
equal the book's code at the same seed. That rests on drawing random numbers in
the book's order, which this module keeps on purpose:
  1. ``torch.manual_seed(seed)``, then the model is built (its init draws);
  2. per epoch, iterating the shuffling training DataLoader draws its base seed,
     then the sampler's permutation seed (``WindowBatchSampler``);
  3. dropout draws during each forward pass;
  4. every evaluation iterates a fresh shuffling loader over the training
     windows (the book evaluates on ``train_loader``), drawing two seeds again.
Data loading, metrics, checkpoints and the peak-FLOPs probe draw nothing from
the global RNG. A resumed run restores the RNG state and the epoch's permutation
seed, so it continues the same stream bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from gptcli import loggers, report
from gptcli.checkpoint import (
    Checkpoint,
    find_latest,
    load_checkpoint,
    point,
    prune,
    save_checkpoint,
    step_dir_name,
)
from gptcli.config import SHAPE_FIELDS, Config
from gptcli.data import Splits, load_splits, make_loader
from gptcli.device import resolve_device
from gptcli.documents import as_trained
from gptcli.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_state,
    gradient_sync,
    init_distributed,
    load_full_state,
    process_device,
    shutdown,
    wrap_model,
)
from gptcli.download import Progress
from gptcli.errors import GptcliError, InputError, RunError
from gptcli.evaluate import evaluate_loss
from gptcli.generate import generate
from gptcli.metrics import Metrics
from gptcli.mixture import weighted_mean
from gptcli.model import GPTModel, flops_per_token, load_state_dict, pad_vocab, trim_vocab
from gptcli.loss import training_loss
from gptcli.hostmem import set_host_memory
from gptcli.optim import (
    build_optimizer,
    check_optimizer,
    full_optimizer_states,
    in_backward_blocker,
    load_optimizer_states,
    optimizer_parts,
    step_in_backward,
)
from gptcli.perf import MfuMeter, peak_flops
from gptcli.precision import DTYPES, LossScaler, autocast as _autocast, resolve_precision
from gptcli.rundir import RUN_MANIFEST, StopSignals, prepare_run_dir, read_manifest, record_end, write_run_manifest
from gptcli.tasks import Task, evaluate_tasks, tasks_due, tasks_from_config
from gptcli.tokenizer import VOCAB_SIZE, decode, encode


class Events:
    """What the loop reports; the CLI overrides these to render progress. All no-ops here."""

    def start(self, info: dict[str, Any]) -> None: ...
    def log(self, record: dict[str, Any]) -> None: ...
    def eval(self, record: dict[str, Any]) -> None: ...
    def sample(self, epoch: int, text: str) -> None: ...
    def checkpoint(self, path: Path) -> None: ...
    def warn(self, message: str) -> None: ...
    def note(self, message: str) -> None: ...  # a choice the run made for the user (not a warning)
    download: Progress | None = None


class Interrupted(GptcliError):
    """SIGINT/SIGTERM/SIGHUP: the current step finished, a checkpoint was saved.

    With `summary`: the signal came during the step that completed the run, or after it (the final
    checkpoint, plot, teardown). The run finished (run.json says so) and `summary` is train's result;
    the exit code is still the signal's, so that a caller (a shell's ``&&``, a scheduler) sees it honoured.
    """

    def __init__(self, signum: int, checkpoint: Path, run_dir: Path, summary: dict[str, Any] | None = None):
        name = signal.Signals(signum).name
        if summary is None:
            message = f"{name}: stopped after saving {checkpoint}; continue with: gptcli train --out {run_dir} --resume"
        else:
            message = f"{name}: the run finished as it arrived (step {summary['steps']}, saved {checkpoint}); nothing to resume"
        super().__init__(message)
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint
        self.summary = summary
        self.signum = signum


@dataclass
class _Position:
    """Where the training stream stands: the next micro-batch to read."""

    epoch: int = 0
    windows_done: int = 0  # windows of `epoch` already consumed (global, all ranks)
    seed: int | None = None  # permutation seed of `epoch` once drawn


@dataclass
class TrainState:
    """Where the run stands: what a checkpoint's train_state stores, beside the optimizer's state."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    position: _Position = field(default_factory=_Position)
    rng: dict[str, Any] | None = None  # the saved RNG state, restored when the stream starts (a resume)
    best_val_loss: float = math.inf
    best_step: int | None = None  # the step whose evaluation set best_val_loss in this session
    last_eval: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0  # seconds of the earlier sessions of the run
    mixture: dict[str, Any] | None = None  # every source's position (data.path a list)
    # Not saved: derived from the position, or about this session.
    epoch_progress: float = 0.0  # fractional epochs done, where evaluations land on the plot
    finished_epochs: list[int] = field(default_factory=list)  # epochs that ended during this step
    last_saved_step: int = -1  # -1: no checkpoint written or resumed from

    @property
    def epoch_number(self) -> int:
        """1-based epoch of the last batch read."""
        return math.floor(self.epoch_progress - 1e-9) + 1

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], epoch_windows: int) -> "TrainState":
        position = _Position(saved["epoch"], saved["windows_done"], saved["epoch_seed"])
        return cls(step=saved["step"], tokens_seen=saved["tokens_seen"], position=position, rng=saved["rng"],
                   best_val_loss=saved.get("best_val_loss", math.inf), last_eval=saved.get("last_eval", {}),
                   elapsed_s=saved.get("elapsed_s", 0.0), mixture=saved.get("mixture"),
                   epoch_progress=position.epoch + position.windows_done / epoch_windows, last_saved_step=saved["step"])

    def to_checkpoint(self, optimizer: dict, rng: dict[str, Any], elapsed_s: float) -> dict[str, Any]:
        """The train_state a checkpoint stores (the keys every gptcli version wrote and reads)."""
        return {"optimizer": optimizer, "step": self.step, "tokens_seen": self.tokens_seen,
                "epoch": self.position.epoch, "windows_done": self.position.windows_done,
                "epoch_seed": self.position.seed, "rng": rng, "best_val_loss": self.best_val_loss,
                "last_eval": self.last_eval, "elapsed_s": elapsed_s,
                **({"mixture": self.mixture} if self.mixture is not None else {})}


@dataclass
class _Run:
    """What the build stage assembles and every later stage uses; fixed for the session."""

    cfg: Config
    run_dir: Path
    splits: Splits
    device: torch.device
    info: DistInfo
    events: Events
    model: GPTModel  # the unwrapped model (samples, parameter count)
    wrapped: torch.nn.Module  # DDP/FSDP wrapper (gradient sync, state dicts), or the model
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], Any]
    forward_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scorer: torch.nn.Module  # what evaluation calls
    train_loader: Any
    train_eval_loader: Any
    val_loader: Any
    total_steps: int
    epoch_windows: int  # windows in one epoch of the global batch (per_epoch x global_batch)
    tokens_per_micro: int  # tokens of one global micro-batch
    total_micro: int  # micro-batches of all epochs
    reduce: Callable[[list[float]], list[float]] | None  # sum over processes, None with one
    guard: "_NonFiniteGuard"
    scaler: LossScaler  # fp16: gradient scaling; otherwise a pass-through
    eval_tasks: list  # train.eval_tasks, read and checked before the first step (tasks.py)
    trackers: loggers.Trackers  # train.loggers (rank 0): a metrics sink, plus samples and the plot
    precision: str  # train.precision as resolved for this device (auto chosen)
    in_backward: bool  # train.optimizer_in_backward: backward steps the optimizer (optim.step_in_backward)


def train(
    cfg: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    init_from: Path | None = None,
    events: Events | None = None,
    allow_data_change: bool = False,
    defer_nonfinite_check: bool | None = None,
) -> dict[str, Any]:
    """Train `cfg` into `run_dir`; return a summary of the run.

    ``train.host_memory`` is a process-wide allocator policy: the program's entry point applies it
    (``apply_host_memory``, which ``gptcli train`` calls); ``train.tf32`` is applied for the run
    and restored afterwards.

    Args:
        cfg: the resolved config.
        run_dir: the run directory (checkpoints, metrics, plot, run.json).
        resume: continue from the newest valid checkpoint in `run_dir`.
        overwrite: delete an existing `run_dir` first (only a gptcli run's own files; a folder
            holding anything else is refused).
        init_from: start from these weights (continued pretraining), with a fresh optimizer.
        events: progress callbacks.
        allow_data_change: resume on a corpus whose sha256 differs from the one in run.json.
        defer_nonfinite_check: check the loss for non-finite values only at log, evaluation and
            checkpoint points (no host sync per step; a bad step's update is skipped on the device
            and reported at the next check). Needs ``train.optimizer_impl: fused``. None: on CUDA
            with the fused optimizer.

    Raises:
        InputError: bad data, config or run directory (nothing is written then).
        RunError: a non-finite loss or a failing disk.
        Interrupted: SIGINT/SIGTERM/SIGHUP after the checkpoint was written; also when the signal came
            with the last step or after it (the run finished: its ``summary`` is the result).
        KeyboardInterrupt: a second Ctrl-C, which stops at once (run.json: interrupted).
    """
    events = events or Events()
    device = resolve_device(cfg.train.device)
    info = init_distributed(device)
    if info.is_main and (warning := book_exact_warning(cfg.model.impl, device)):
        events.warn(warning)
    device = process_device(device, info)
    try:
        return _train(cfg, run_dir, resume, overwrite, init_from, events, device, info, allow_data_change,
                      defer_nonfinite_check)
    except OSError as e:  # a failing disk outside a checkpoint write: run.json, the lock's pid, metrics, the plot
        raise RunError(f"{e.filename or run_dir}: {e.strerror or e}") from None
    finally:
        shutdown(info)


def apply_host_memory(policy: str) -> str | None:
    """Apply ``train.host_memory`` to this process (glibc malloc); returns a warning if it cannot.

    A process-wide setting: call it once at the program's start (``gptcli train`` does), not from
    a library function. "default" changes nothing.
    """
    global _HOST_MEMORY_APPLIED
    if policy == "default":
        return None
    if not set_host_memory(policy):
        return f"train.host_memory {policy}: not supported by this C library; ignored"
    _HOST_MEMORY_APPLIED = policy
    return None


_HOST_MEMORY_APPLIED: str | None = None  # the policy apply_host_memory set in this process


def _train(cfg, run_dir, resume, overwrite, init_from, events, device, info: DistInfo, allow_data_change,
           defer_nonfinite_check):
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if info.is_main and t.host_memory not in ("default", _HOST_MEMORY_APPLIED):
        events.warn(f"train.host_memory {t.host_memory}: not applied in this process (the program applies it at "
                    "its start: gptcli.train.apply_host_memory)")
    if not info.enabled and t.distributed == "fsdp":  # a one-process resume of an FSDP run included
        events.warn("train.distributed fsdp: one process has nothing to shard; it trains unsharded (FSDP applies "
                    "under torchrun: gptcli train --nproc N)")
    # Rank 0 first: a missing default corpus is downloaded once, not by every process at the same time.
    splits = _on_main(info, lambda: load_splits(cfg.data, cfg.model.context_length, progress=events.download))
    if not info.is_main:
        splits = load_splits(cfg.data, cfg.model.context_length)
    _check_batches(splits, t.batch_size, info.world_size)
    _check_vocab(cfg)
    precision = resolve_precision(t.precision, device)[0]  # a precision this device cannot train in: refused here
    _loss_chunk(cfg, info)
    check_optimizer(t, fsdp=info.enabled and t.distributed == "fsdp")
    eval_tasks = tasks_from_config(t.eval_tasks)  # read and checked here: a bad task file must not cost the run
    for i, (spec, task) in enumerate(zip(t.eval_tasks, eval_tasks)):
        if not spec.get("data") and info.is_main:  # the tool chose the file: say which
            events.note(f"train.eval_tasks[{i}]: {task.name} from {task.path} "
                        "(the default; its data key chooses another)")

    # Everything that can be wrong with the inputs is checked before the run directory is touched.
    init_weights = None
    if init_from is not None:
        init_weights = load_checkpoint(init_from)
        _check_shapes(cfg, init_weights.config, f"init_from={init_from}")
    ckpt = _find_resume(run_dir, cfg) if resume and run_dir.is_dir() else None  # every rank reads it
    if ckpt is not None and _check_resume(run_dir, cfg, splits, ckpt, info, allow_data_change, events):
        for reason in ckpt.skipped:
            events.warn(f"skipped a damaged checkpoint: {reason}")
        return _finished_summary(run_dir, ckpt)  # nothing to train: the run is left as it is
    defer = _defer_check(defer_nonfinite_check, t, device, precision)
    in_backward = _in_backward(t, info, precision, defer)
    lock = _on_main(info, lambda: prepare_run_dir(run_dir, resume, overwrite))
    # Experiment trackers (rank 0): closed however the run ends, so that a resume continues their runs.
    trackers = loggers.Trackers(t.loggers if info.is_main else [], run_dir, t.logger_timeout, events.warn, ckpt is not None)
    ended: BaseException | None = None  # how the run ended, recorded in run.json for `gptcli runs`
    stop = StopSignals()  # installed by the loop; kept until run.json says how the run ended
    try:
        for reason in ckpt.skipped if ckpt is not None else []:
            events.warn(f"skipped a damaged checkpoint: {reason}")
        with _tf32(_tf32_wanted(cfg, device, events, info)):
            summary = _loop(build(cfg, run_dir, splits, init_weights, events, device, info, defer, in_backward,
                                  trackers, eval_tasks), ckpt, stop)
    except BaseException as e:
        ended = e
        raise
    finally:
        try:
            if lock is not None:
                with stop.held():  # recorded even if a second Ctrl-C comes now
                    record_end(run_dir, ended)
            trackers.close()  # a stopped or failed run is marked so (the exception in flight); a no-op once closed
        finally:
            stop.restore()
            if lock is not None:
                lock.close()
    if stop.signum is not None:  # it came with the last step or after it: every step is saved, the run finished
        raise Interrupted(stop.signum, Path(summary["checkpoint"]), run_dir, summary)
    return summary


def _loop(run: _Run, ckpt: Checkpoint | None, stop: StopSignals) -> dict[str, Any]:
    """The training loop: lr -> accumulate -> optimizer step -> log -> evaluate -> sample -> save.

    A stop signal is checked after each step: the step finishes, a checkpoint is saved and
    Interrupted raised, unless that step completed the run (then the run ends as finished).
    """
    t, info = run.cfg.train, run.info
    state = restore(run, ckpt)
    stream = _micro_batches(run.train_loader, state.position, t.num_epochs, _rng_restorer(run, state))
    metrics = _metrics(run, state)
    if info.is_main:
        manifest = write_run_manifest(run.run_dir, run.cfg, run.splits, run.device, info.world_size,
                                      resumed_at=state.step if ckpt else None)
        run.trackers.start(run.cfg.to_dict(), manifest, state.step)
    run.events.start({
        "run_dir": str(run.run_dir), "total_steps": run.total_steps, "step": state.step, "epochs": t.num_epochs,
        "steps_per_epoch": math.ceil(run.train_loader.batch_sampler.num_batches() / t.grad_accum_steps),
        "device": str(run.device), "world_size": info.world_size, "params": run.model.num_params(),
        "train_tokens": run.splits.train_tokens, "val_tokens": run.splits.val_tokens, "resumed": ckpt is not None,
        "precision": run.precision, "optimizer_in_backward": run.in_backward,
    })
    run.model.train()
    try:
        stop.install()
        while state.step < run.total_steps:
            lr = _set_lr(run.optimizer, _lr_at(state.step, run.total_steps, t))
            log_now = state.step + 1 in (1, run.total_steps) or (state.step + 1) % t.log_freq == 0
            loss, micro_steps = accumulate(run, state, stream, metrics)
            loss_value, grad_norm = optimizer_step(run, state, loss, log_now)
            state.step += 1
            state.tokens_seen += micro_steps * run.tokens_per_micro
            if run.guard.defer and (log_now or (state.step - 1) % t.eval_freq == 0):
                run.guard.check(run, state)
            if info.is_main and log_now:
                run.events.log(metrics.train_record(state.step, state.epoch_number, state.tokens_seen,
                                                    loss_value, lr, grad_norm, run.scaler.scale))
            with metrics.paused():  # throughput counts training time only
                final = state.step == run.total_steps and (state.step - 1) % t.eval_freq != 0
                if (state.step - 1) % t.eval_freq == 0 or final:
                    evaluate(run, state, metrics, lr, final)
                sample(run, state)
                interrupted = _stop_requested(run, stop, log_now)
                done = state.step == run.total_steps  # a signal with this step: the run ends finished
                if done or interrupted or (t.save_freq and state.step % t.save_freq == 0):
                    path = save(run, state, metrics, "end" if done else "interrupt" if interrupted else "cadence")
                    if interrupted and not done:
                        raise Interrupted(stop.signum or signal.SIGTERM, path, run.run_dir)
        if state.last_saved_step != state.step:
            save(run, state, metrics, "end")
    finally:
        with stop.held():
            metrics.close()  # the CSV and the plot complete, also when the run stops on an error or a signal
    return _summary(run, state, metrics.elapsed())


# ---- stages


def build(cfg: Config, run_dir: Path, splits: Splits, init_weights: Checkpoint | None, events: Events,
          device: torch.device, info: DistInfo, defer: bool, in_backward: bool, trackers: loggers.Trackers,
          eval_tasks: list[Task]) -> _Run:
    """The model (book order: seed, build, move, then the optimizer), its wrappers, the loaders."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = GPTModel(cfg.model)
    if init_weights is not None:
        load_state_dict(model, init_weights.weights)
    model.to(device)
    if info.enabled and device.type == "cuda":
        # Every rank shares the CPU stream (same init, same batch order); dropout on the GPU
        # draws from the CUDA stream, which gets a per-rank seed so masks differ across ranks.
        torch.cuda.manual_seed(t.seed + info.rank)
    model.activation_checkpointing = t.activation_checkpointing
    wrapped = wrap_model(model, t.distributed, info, device)
    optimizer = _build_optimizer(wrapped, t)
    if in_backward:
        step_in_backward(wrapped.parameters(), optimizer)
    precision, why = resolve_precision(t.precision, device)
    if why and info.is_main:
        events.note(why)  # auto chose: say which and why
    autocast = _autocast(device, precision)
    # train.loss_chunk: the (B, T, V) logits never exist at once
    forward_loss = functools.partial(_forward_loss, as_trained(wrapped, cfg.data), model.out_head.weight, autocast,
                                     cfg.model.vocab_size, _loss_chunk(cfg, info))
    scorer = as_trained(wrapped, cfg.data)  # document mask inside the compiled region: flex_attention can apply
    if t.compile:
        # The loss is compiled with the model so that the float32 upcast, log-softmax and
        # its backward over B x T x V logits fuse into a few kernels: on an H200 at batch 32
        # that cut the GPU time of a step from 79 ms to 68 ms (the eager loss took a quarter).
        scorer = torch.compile(scorer)  # for evaluation (eval mode compiles its own graph)
        forward_loss = torch.compile(forward_loss)

    pin, sampling = device.type == "cuda", cfg.data.sampling
    train_loader = make_loader(splits.train, t.batch_size, True, True, info.rank, info.world_size, "split", pin, sampling)
    # The book evaluates on its (shuffling) training loader; a separate loader keeps
    # the training epoch's position intact while drawing the same random numbers.
    train_eval_loader = make_loader(splits.train, t.batch_size, True, True, info.rank, info.world_size, "stride", pin, sampling)
    val_loader = make_loader(splits.val, t.batch_size, False, False, info.rank, info.world_size, "stride", pin)
    per_epoch = train_loader.batch_sampler.num_batches()  # micro-batches per epoch
    global_batch = train_loader.batch_sampler.global_batch
    return _Run(cfg, run_dir, splits, device, info, events, model, wrapped, optimizer, autocast, forward_loss,
                scorer, train_loader, train_eval_loader, val_loader,
                total_steps=_total_steps(t, per_epoch, global_batch * cfg.model.context_length),
                epoch_windows=per_epoch * global_batch, tokens_per_micro=global_batch * cfg.model.context_length,
                total_micro=t.num_epochs * per_epoch, reduce=all_reduce_sum if info.enabled else None,
                guard=_NonFiniteGuard(defer, device), scaler=LossScaler(device, precision), precision=precision,
                eval_tasks=eval_tasks, trackers=trackers, in_backward=in_backward)


def restore(run: _Run, ckpt: Checkpoint | None) -> TrainState:
    """A fresh TrainState, or the checkpoint's: weights, optimizer, position, mixture, RNG."""
    if ckpt is None:
        return TrainState()
    saved = ckpt.train_state
    load_full_state(run.wrapped, optimizer_parts(run.optimizer)[0], pad_vocab(ckpt.weights, run.cfg.model),
                    saved["optimizer"])
    load_optimizer_states(run.wrapped, run.optimizer, saved, f"resume=True, {ckpt.path}")  # Muon's, beside AdamW's
    if run.scaler.enabled and saved.get("grad_scaler"):
        run.scaler.load_state_dict(saved["grad_scaler"])
    state = TrainState.from_checkpoint(saved, run.epoch_windows)
    if run.splits.sources:  # a mixture: the position in every source
        if state.mixture is None:
            raise InputError(f"resume=True, {ckpt.path}: the checkpoint holds no mixture positions; data.path was "
                             "not a list then")
        run.train_loader.batch_sampler.load_state(state.mixture)
    return state


def accumulate(run: _Run, state: TrainState, stream, metrics: Metrics) -> tuple[torch.Tensor, int]:
    """Forward and backward over one step's micro-batches; returns their mean loss (on the device).

    Under DDP/FSDP only the last micro-batch's backward reduces the gradients across processes.
    """
    micro_steps = min(run.cfg.train.grad_accum_steps, run.total_micro - state.step * run.cfg.train.grad_accum_steps)
    loss_sum = torch.zeros((), device=run.device)
    for i in range(micro_steps):
        with metrics.waiting_for_data():
            epoch, inputs, targets, windows_after, seed, epoch_done = next(stream)
        inputs = inputs.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        with gradient_sync(run.wrapped, enabled=i == micro_steps - 1):
            loss = run.forward_loss(inputs, targets)
            if run.in_backward:  # backward steps the optimizer: check the loss before it does
                run.guard.before_step(run, state, loss, log_now=True)
            run.scaler.backward(loss / micro_steps if micro_steps > 1 else loss)
        loss_sum += loss.detach()
        state.position = _Position(epoch + 1, 0, None) if epoch_done else _Position(epoch, windows_after, seed)
        state.epoch_progress = epoch + windows_after / run.epoch_windows
        if epoch_done:
            state.finished_epochs.append(epoch)
    return (loss_sum / micro_steps if micro_steps > 1 else loss_sum), micro_steps


def optimizer_step(run: _Run, state: TrainState, loss: torch.Tensor, log_now: bool) -> tuple[float | None, float | None]:
    """Non-finite check, clip, step; returns the loss (averaged over processes) at checks and the grad norm.

    With ``train.optimizer_in_backward`` backward already stepped (and checked the loss before).
    """
    loss_value = run.guard.before_step(run, state, loss, log_now)
    if run.in_backward:
        return loss_value, None
    grad_norm = None
    run.scaler.unscale(run.optimizer)  # fp16: the true gradients before clipping
    if run.cfg.train.grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), run.cfg.train.grad_clip)
    if not run.scaler.enabled:
        run.guard.step(run.optimizer)
    elif not run.scaler.step(run.optimizer, loss_finite=math.isfinite(loss_value)):
        run.events.warn(f"step {state.step + 1}: fp16 overflow; update skipped, loss scale lowered to "
                        f"{run.scaler.scale:g}")
    run.optimizer.zero_grad(set_to_none=True)
    return loss_value, (float(grad_norm) if grad_norm is not None and log_now else None)


def evaluate(run: _Run, state: TrainState, metrics: Metrics, lr: float, final: bool) -> None:
    """The book's evaluation (after the first step and every eval_freq steps), and the final weights'.

    A new lowest validation loss whose weights no step checkpoint will hold is saved as RUN/best.
    """
    t = run.cfg.train
    # The final evaluation leaves the RNG as it found it: its training-loader draws would
    # otherwise change what a run extended by resume=True trains on.
    rng_before = _get_rng(run.device, run.info) if final else None
    batches = _eval_batches(run)
    train_eval = evaluate_loss(run.scorer, run.train_eval_loader, run.device, batches, run.autocast, run.reduce)
    by_source = _source_losses(run)
    if by_source:  # a mixture: the overall loss weighs each source's as the mixture does
        sources = run.splits.sources
        val_eval = {"loss": weighted_mean([by_source[n] for n, _, _ in sources], [w for _, w, _ in sources])}
    else:
        val_eval = evaluate_loss(run.scorer, run.val_loader, run.device, batches, run.autocast, run.reduce)
    if rng_before is not None:
        _set_rng(rng_before, run.device, run.info, t.seed + state.step)
    # Multiple-choice accuracy (train.eval_tasks): eval mode, no RNG draws, so training is unchanged.
    task_scores = (evaluate_tasks(as_trained(run.wrapped, run.cfg.data), run.eval_tasks, run.device,
                                  autocast=run.autocast)
                   if tasks_due(t, state.step, state.step == run.total_steps) else {})
    fields = {
        "step": state.step, "epoch": state.epoch_number, "epoch_progress": state.epoch_progress,
        "tokens_seen": state.tokens_seen, "train_loss": train_eval["loss"], "val_loss": val_eval["loss"], "lr": lr,
        **({"final": True} if final else {}), **({"val_loss_by_source": by_source} if by_source else {}),
        **({"tasks": task_scores} if task_scores else {}),
    }
    if run.info.is_main:
        state.last_eval = metrics.eval_record(**fields)
        run.events.eval(state.last_eval)
        run.trackers.image("losses", run.run_dir / report.PLOT)
    else:
        state.last_eval = {"event": "eval", **fields, "elapsed_s": metrics.elapsed()}
    if math.isfinite(val_eval["loss"]) and val_eval["loss"] < state.best_val_loss:
        state.best_val_loss, state.best_step = val_eval["loss"], state.step
        if not (state.step == run.total_steps or (t.save_freq and state.step % t.save_freq == 0)):
            save_best(run, state)  # no step checkpoint will hold these weights


def sample(run: _Run, state: TrainState) -> None:
    """A greedy sample after each epoch that ended in this step, as the book prints."""
    for epoch in state.finished_epochs:
        if run.cfg.train.max_new_tokens > 0:
            text = _sample(run.model, run.cfg, run.cfg.train.start_context, run.cfg.train.max_new_tokens)
            run.events.sample(epoch + 1, text)
            run.trackers.text("samples", text)
    state.finished_epochs.clear()
    run.model.train()


def save(run: _Run, state: TrainState, metrics: Metrics, reason: str) -> Path | None:
    """A step checkpoint (weights, optimizer, TrainState), the latest/best links, pruning."""
    run.guard.check(run, state)  # never save after a non-finite step
    model_sd, optim_sd = full_state(run.wrapped, optimizer_parts(run.optimizer)[0])
    more_optim = full_optimizer_states(run.wrapped, run.optimizer)  # {"muon": ...} with train.optimizer muon
    rng_state = _get_rng(run.device, run.info)
    if run.splits.sources:
        state.mixture = run.train_loader.batch_sampler.state()
    path = None
    if run.info.is_main:
        train_state = {**state.to_checkpoint(optim_sd, rng_state, metrics.elapsed()), **more_optim,
                       **({"grad_scaler": run.scaler.state_dict()} if run.scaler.enabled else {})}
        path = save_checkpoint(run.run_dir, step_dir_name(state.step), trim_vocab(model_sd, run.cfg.model), run.cfg,
                               train_state, _checkpoint_meta(state, reason))
        point(run.run_dir, "latest", path)
        if state.best_step == state.step:  # these are the weights of the lowest validation loss measured
            point(run.run_dir, "best", path)
        prune(run.run_dir, run.cfg.train.keep_last)
        run.events.checkpoint(path)
    barrier(run.info)
    state.last_saved_step = state.step
    return path


def save_best(run: _Run, state: TrainState) -> None:
    """RUN/best: the weights of this step, which set a new lowest validation loss (weights only)."""
    run.guard.check(run, state)
    model_sd, _ = full_state(run.wrapped, optimizer_parts(run.optimizer)[0])
    if run.info.is_main:
        save_checkpoint(run.run_dir, "best", trim_vocab(model_sd, run.cfg.model), run.cfg, None,
                        _checkpoint_meta(state, "best"))
    barrier(run.info)


def _checkpoint_meta(state: TrainState, reason: str) -> dict[str, Any]:
    """What every checkpoint's manifest (step-*, best/) says of itself; `epoch` counts the epochs completed
    (0 during the first), as train_state's `epoch` and the summary's `epochs_completed` do."""
    return {"step": state.step, "epoch": state.position.epoch, "tokens_seen": state.tokens_seen, "reason": reason,
            "val_loss": state.last_eval.get("val_loss"), "train_loss": state.last_eval.get("train_loss")}


# ---- the stages' parts


class _NonFiniteGuard:
    """Stops the run on a non-finite loss before the optimizer applies it.

    Immediate: the loss is read on the host before every step (free on the CPU). Deferred: where
    a host sync costs (CUDA), the loss is read only at log points; between them a non-finite
    loss makes the fused AdamW skip its update on the device, and the step is reported at the
    next log, evaluation or checkpoint.
    """

    def __init__(self, defer: bool, device: torch.device):
        self.defer = defer
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # first step with a non-finite loss
        self._found_inf: torch.Tensor | None = None  # 1.0 when this step's loss was non-finite (deferred)

    def before_step(self, run: _Run, state: TrainState, loss: torch.Tensor, log_now: bool) -> float | None:
        """The loss on the host (averaged over processes) when checked now; None when deferred."""
        step = state.step + 1
        if not self.defer or log_now:
            value = loss.item()
            if run.reduce is not None:
                value = run.reduce([value])[0] / run.info.world_size
            # fp16 with the scaler: a non-finite loss is an overflow, skipped by the step (precision.py)
            if not math.isfinite(value) and not run.scaler.absorbs_nonfinite():
                raise _nonfinite(value, step, run.run_dir, state.last_saved_step, "stopped before the optimizer step")
            self._found_inf = None
            return value
        bad = (~torch.isfinite(loss)).float()
        if run.info.enabled:
            torch.distributed.all_reduce(bad)  # every rank skips, or none
        self.first_bad = torch.where((bad > 0) & (self.first_bad == 0), step, self.first_bad)
        self._found_inf = bad
        return None

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(), skipped on the device when the deferred check found a non-finite loss.

        PyTorch's fused AdamW reads the skip flag from ``optimizer.found_inf`` (the protocol
        torch.amp.GradScaler.step uses): it is set for this call only and removed after it.
        """
        if self._found_inf is None:
            optimizer.step()
            return
        optimizer.found_inf = self._found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
            self._found_inf = None

    def check(self, run: _Run, state: TrainState) -> None:
        """Raise if a deferred check flagged a step (a host sync: only at log, eval and save points)."""
        if self.defer and int(self.first_bad) != 0:
            raise _nonfinite(float("nan"), int(self.first_bad), run.run_dir, state.last_saved_step,
                             f"its update was skipped; stopped at step {state.step}")


def _defer_check(requested: bool | None, t, device: torch.device, precision: str) -> bool:
    """Whether the non-finite check is deferred: asked for, or by default on CUDA with the fused AdamW
    (alone: Muon has no device-side skip, and fp16's scaler decides about non-finite steps itself)."""
    able = t.optimizer_impl == "fused" and t.optimizer == "adamw" and precision != "fp16"
    if requested and not able:
        raise InputError(f"defer_nonfinite_check=True: needs train.optimizer_impl fused (it is {t.optimizer_impl}) "
                         f"with train.optimizer adamw (it is {t.optimizer}) and not fp16; only the fused AdamW can "
                         "skip an update on the device")
    return requested if requested is not None else (device.type == "cuda" and able)


def _forward_loss(module: torch.nn.Module, head_weight: torch.Tensor, autocast: Callable[[], Any], vocab_size: int,
                  loss_chunk, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # No name for the logits: held through backward they would cost B x T x V floats
    # (400 MB at batch 8) that the loss no longer needs (it keeps its own softmax).
    with autocast():
        return training_loss(module, head_weight, inputs, targets, vocab_size, loss_chunk)


def _in_backward(t, info: DistInfo, precision: str, defer: bool) -> bool:
    """train.optimizer_in_backward, checked.

    Raises:
        InputError: true where it cannot apply, naming the key that forbids it.
    """
    blocker = in_backward_blocker(t, info.enabled, precision, defer) if t.optimizer_in_backward else None
    if blocker:
        raise InputError(f"train.optimizer_in_backward=true: cannot apply: {blocker}")
    return t.optimizer_in_backward


def _tf32_wanted(cfg: Config, device: torch.device, events: Events, info: DistInfo) -> bool:
    """train.tf32: TF32 tensor cores for float32 matmuls (CUDA); None = on with model.impl fused."""
    tf32 = cfg.train.tf32
    if tf32 and device.type != "cuda" and info.is_main:
        events.warn(f"train.tf32 true: TF32 is a CUDA feature; no effect on {device.type}")
    return device.type == "cuda" and (tf32 if tf32 is not None else cfg.model.impl == "fused")


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions inside, the caller's settings restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _rng_restorer(run: _Run, state: TrainState) -> Callable[[], None] | None:
    """Restores the checkpoint's RNG state: now for a fresh epoch (its loader draws come from the
    restored stream), or returned for the stream to call once it re-created a mid-epoch loader."""
    if state.rng is None:
        return None
    restore_rng = functools.partial(_set_rng, state.rng, run.device, run.info, run.cfg.train.seed + state.step)
    state.rng = None
    if state.position.windows_done == 0:
        restore_rng()
        return None
    return restore_rng


def _metrics(run: _Run, state: TrainState) -> Metrics:
    """The metrics component; on rank 0 it writes metrics.jsonl and the live CSV and plot."""
    sinks: list = []
    mfu = None
    if run.info.is_main:
        mfu = _mfu_meter(run.cfg.train, run.device, run.events)
        sinks.append(report.MetricsLog(run.run_dir, resume_step=state.step))  # truncates a resumed run's file first
        sinks.append(report.LiveReport(run.run_dir))
        sinks.append(run.trackers)  # train.loggers: TensorBoard, W&B, MLflow
    return Metrics(sinks, run.device, flops_per_token(run.cfg.model), run.info.world_size, mfu, run.total_steps,
                   state.step, state.tokens_seen, state.elapsed_s)


def _stop_requested(run: _Run, stop: StopSignals, log_now: bool) -> bool:
    """A stop signal arrived on any process (the ranks must agree, or one would save while another steps on)."""
    interrupted = stop.signum is not None
    if run.reduce is not None:
        # A host sync: with deferred checks only at log points, where one happens anyway.
        interrupted = run.reduce([float(interrupted)])[0] > 0 if (not run.guard.defer or log_now) else False
    return interrupted


def _summary(run: _Run, state: TrainState, elapsed: float) -> dict[str, Any]:
    return _run_summary(run.run_dir, state, run.run_dir / step_dir_name(state.step), elapsed)


def _run_summary(run_dir: Path, state: TrainState, checkpoint: Path, elapsed: float) -> dict[str, Any]:
    """What `train` returns (the CLI's --json): where the run stands, its losses, its final checkpoint."""
    return {
        "run_dir": str(run_dir), "steps": state.step, "tokens_seen": state.tokens_seen,
        "epochs_completed": state.position.epoch, "train_loss": state.last_eval.get("train_loss"),
        "val_loss": state.last_eval.get("val_loss"),
        **({"tasks": state.last_eval["tasks"]} if "tasks" in state.last_eval else {}),
        "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        "checkpoint": str(checkpoint), "elapsed_s": elapsed,
        "tokens_per_s": state.tokens_seen / elapsed if elapsed > 0 else None,
    }


def _source_losses(run: _Run) -> dict[str, float]:
    """Validation loss of each source of a mixture ({} for a single corpus)."""
    out = {}
    t, info = run.cfg.train, run.info
    for name, _, windows in run.splits.sources:
        loader = make_loader(windows, t.batch_size, False, False, info.rank, info.world_size, "stride",
                             run.device.type == "cuda")
        out[name] = evaluate_loss(run.scorer, loader, run.device, _eval_batches(run), run.autocast, run.reduce)["loss"]
    return out


def _eval_batches(run: _Run) -> int | None:
    """Batches of the per-process batch size that train.eval_iter means: the evaluation loaders give whole
    batches to the ranks in turn, so N processes score eval_iter x N of them, the windows one process with
    batch N x b scores in eval_iter batches (the same estimate at any process count, also across a resume)."""
    eval_iter = run.cfg.train.eval_iter
    return eval_iter * run.info.world_size if eval_iter is not None else None


def _nonfinite(value: float, at_step: int, run_dir: Path, last_saved_step: int, what: str) -> RunError:
    kept = (f"the last good checkpoint is {run_dir / step_dir_name(last_saved_step)}" if last_saved_step >= 0
            else "no checkpoint was written")
    return RunError(f"non-finite loss ({value}) at step {at_step}; {what}; {kept}")


def _micro_batches(loader, pos: _Position, num_epochs: int, restore_rng: Callable[[], None] | None):
    """Yield (epoch, inputs, targets, windows_done_after, epoch_seed, epoch_done) from `pos` on."""
    sampler = loader.batch_sampler
    gb = sampler.global_batch
    for epoch in range(pos.epoch, num_epochs):
        start = pos.windows_done if epoch == pos.epoch else 0
        if start:
            sampler.resume(pos.seed, start)
        batches_left = sampler.num_batches() - math.ceil(start / gb)
        it = iter(loader)  # draws the DataLoader's base seed from the global RNG
        if restore_rng is not None:
            restore_rng()  # mid-epoch resume: continue the stream the checkpoint saved
            restore_rng = None
        windows = start
        for i, (inputs, targets) in enumerate(it):
            windows += gb
            yield epoch, inputs, targets, windows, sampler.seed, i == batches_left - 1


def _lr_at(step: int, total_steps: int, t) -> float:
    """Learning rate of optimizer step `step` (0-based): constant, or linear warmup + cosine decay."""
    if t.lr_schedule == "constant":
        return t.learning_rate
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    decay_steps = max(total_steps - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / decay_steps, 1.0)
    return t.min_lr + 0.5 * (t.learning_rate - t.min_lr) * (1.0 + math.cos(math.pi * progress))


_build_optimizer = build_optimizer  # gptcli.optim; the name other modules call


def _loss_chunk(cfg: Config, info: DistInfo):
    """train.loss_chunk as it applies: auto is the plain loss (0) for book-exact runs and under FSDP.

    Raises:
        InputError: a number of rows under FSDP (the head's weight is sharded outside the forward pass).
    """
    t = cfg.train
    fsdp = info.enabled and t.distributed == "fsdp"
    if t.loss_chunk == "auto":
        return 0 if cfg.model.impl == "book" or fsdp else "auto"
    if t.loss_chunk and fsdp:
        raise InputError(f"train.loss_chunk {t.loss_chunk}: not with train.distributed fsdp (the output head is "
                         "sharded outside the forward pass); use 0 or auto")
    return t.loss_chunk


def _mfu_meter(t, device: torch.device, events: Events) -> MfuMeter:
    dtype = DTYPES[resolve_precision(t.precision, device)[0]]
    if t.peak_flops is not None:
        return MfuMeter(device, dtype, t.peak_flops, measured=False, warn=events.warn)
    if device.type == "cpu" and dtype == torch.float16:
        return MfuMeter(device, dtype, None)  # emulated fp16 matmuls: measuring their peak takes minutes
    try:
        peak = peak_flops(device, dtype)
    except RuntimeError:
        peak = None
    return MfuMeter(device, dtype, peak, warn=events.warn)


def _get_rng(device: torch.device, info: DistInfo) -> dict[str, Any]:
    """The CPU RNG state (shared by all ranks) and every rank's CUDA RNG state (call on all ranks)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = all_gather_objects(torch.cuda.get_rng_state(device), info)
    return state


def _set_rng(state: dict[str, Any], device: torch.device, info: DistInfo, fallback_seed: int) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        per_rank = state.get("cuda")
        if isinstance(per_rank, list) and len(per_rank) == info.world_size:
            torch.cuda.set_rng_state(per_rank[info.rank], device)
        else:  # another process count than the run that saved it: fresh per-rank streams
            torch.cuda.manual_seed(fallback_seed + info.rank)


def _sample(model: GPTModel, cfg: Config, prompt: str, max_new_tokens: int) -> str:
    """The book's generate_and_print_sample: greedy, newlines folded to spaces."""
    model.eval()
    ids = encode(prompt)
    # The book's full recompute keeps book-exact samples exact; the fused model uses the cache.
    out = generate(model, [ids], max_new_tokens, use_cache=cfg.model.impl != "book")[0]
    model.train()
    return decode(ids + out).replace("\n", " ")


def _total_steps(t, per_epoch: int, tokens_per_micro: int) -> int:
    """Optimizer steps of the whole run: num_epochs, capped by max_steps and max_tokens."""
    total_steps = math.ceil(t.num_epochs * per_epoch / t.grad_accum_steps)
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    if t.max_tokens is not None:
        total_steps = min(total_steps, math.ceil(t.max_tokens / (tokens_per_micro * t.grad_accum_steps)))
    return total_steps


def _check_resume(run_dir: Path, cfg: Config, splits: Splits, ckpt: Checkpoint, info: DistInfo,
                  allow_data_change: bool, events) -> bool:
    """Refuse a resume that cannot continue the saved epoch exactly; say when the run is already done (True).

    The epoch's position is a count of windows in batches of the saved global batch over the saved
    corpus: another process count or another number of windows would skip or repeat windows.
    """
    manifest = read_manifest(run_dir)
    runs = [manifest] + list(manifest.get("resumes") or [])
    step = ckpt.train_state["step"]
    # The session that saved the checkpoint: the last one started before its step (a resume stopped before
    # its first checkpoint, perhaps at another process count, saved nothing of what is resumed now).
    world = next((r["world_size"] for r in reversed(runs)
                  if isinstance(r.get("world_size"), int) and (r.get("at_step") or 0) < step), info.world_size)
    saved_batch, batch = ckpt.config.train.batch_size, cfg.train.batch_size
    if world * saved_batch != info.world_size * batch:
        raise InputError(
            f"resume=True: train.batch_size {batch} x {info.world_size} process(es) is a global batch of "
            f"{info.world_size * batch} windows; the run's is {saved_batch} x {world} = {world * saved_batch}, and its "
            f"position in the epoch counts those: keep the global batch (e.g. train.batch_size {saved_batch} with "
            f"{world} process(es))")
    if "mixture" in ckpt.train_state and not splits.sources:
        # Its position is one per source of the mixture: a single data.path would silently restart the data.
        raise InputError(f"resume=True: {ckpt.path} trained on a mixture (data.path was a list); data.path "
                         f"{splits.source} is a single source, on which the saved positions cannot continue")
    corpus = manifest.get("corpus") or {}
    if not corpus.get("sha256") and (run_dir / RUN_MANIFEST).exists() and not allow_data_change:
        raise InputError(f"resume=True: {run_dir / RUN_MANIFEST} is unreadable or names no corpus, so data.path "
                         f"{splits.source} cannot be checked against the corpus this run trained on; pass "
                         "allow_data_change=True to continue on it")
    if corpus.get("sha256") and corpus["sha256"] != splits.sha256:
        if not allow_data_change:
            raise InputError(f"resume=True: data.path {splits.source} (sha256 {splits.sha256[:12]}) is not the corpus "
                             f"this run trained on ({corpus.get('path')}, sha256 {corpus['sha256'][:12]}); "
                             "pass allow_data_change=True to continue on it")
        old = corpus.get("train_windows")  # recorded since mixtures: the sum of each source's windows
        if not isinstance(old, int) and isinstance(corpus.get("train_tokens"), int):  # an older run.json: one stream
            ctx, stride = cfg.model.context_length, cfg.data.stride or cfg.model.context_length
            old = len(range(0, max(corpus["train_tokens"] - ctx, 0), stride))
        if isinstance(old, int) and old != len(splits.train):
            raise InputError(f"allow_data_change=True: the training split of {splits.source} has {len(splits.train)} "
                             f"windows, the run's corpus had {old}; the epoch "
                             "position cannot carry over (start a new run from its checkpoint with `init_from` instead)")
    per_epoch = len(splits.train) // (cfg.train.batch_size * info.world_size)  # the loader drops a partial batch
    total = _total_steps(cfg.train, per_epoch, cfg.train.batch_size * info.world_size * cfg.model.context_length)
    if step >= total:
        events.warn(f"{run_dir}: the run already finished at step {step}; nothing to train. To extend it, "
                    f"resume with --max-steps N or --num-epochs N beyond it (train.max_steps, train.num_epochs; now {cfg.train.num_epochs} epoch(s)"
                    f"{f', max_steps {cfg.train.max_steps}' if cfg.train.max_steps else ''})")
        return True
    return False


def _finished_summary(run_dir: Path, ckpt: Checkpoint) -> dict[str, Any]:
    """The summary of a run resumed at its end, from its newest checkpoint; this session trained nothing."""
    state = TrainState.from_checkpoint(ckpt.train_state, epoch_windows=1)  # epoch_progress is not reported
    # The run's own training time (all its sessions), so that tokens_per_s is the run's, as at its end.
    return {**_run_summary(run_dir, state, ckpt.path, state.elapsed_s), "already_finished": True}


def _check_batches(splits: Splits, batch_size: int, world_size: int) -> None:
    need = batch_size * world_size
    if len(splits.train) < need:
        raise InputError(
            f"{splits.source}: the training split has {len(splits.train)} window(s) "
            f"({splits.train_tokens} tokens); batch_size {batch_size} x {world_size} process(es) needs {need}"
        )


def _check_vocab(cfg: Config) -> None:
    """The data holds GPT-2 token ids: a smaller vocabulary has no embedding row for some of them."""
    if cfg.model.vocab_size < VOCAB_SIZE:
        raise InputError(f"model.vocab_size {cfg.model.vocab_size} (from {cfg.origin('model.vocab_size')}): below the "
                         f"{VOCAB_SIZE} token ids of the GPT-2 tokenizer the data is encoded with; use at least "
                         f"{VOCAB_SIZE}", param="model.vocab_size")


def _check_shapes(cfg: Config, other: Config, what: str) -> None:
    fields = SHAPE_FIELDS + ("pad_vocab_multiple",)
    diff = [f"{k} {getattr(other.model, k)} vs {getattr(cfg.model, k)}"
            for k in fields if getattr(other.model, k) != getattr(cfg.model, k)]
    if diff:
        raise InputError(f"{what}: the model shape differs from the config (checkpoint vs config): {'; '.join(diff)}")


def _find_resume(run_dir: Path, cfg: Config) -> Checkpoint:
    latest, skipped = find_latest(run_dir)
    if latest is None:
        why = f" ({skipped[0]})" if skipped else ""
        raise InputError(f"resume=True: no complete checkpoint in {run_dir}{why}")
    ckpt = load_checkpoint(latest, with_train_state=True)
    ckpt.skipped = skipped
    _check_shapes(cfg, ckpt.config, f"resume=True, {latest}")
    return ckpt


def _on_main(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0; an error there is raised on every rank."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except GptcliError as e:
            error = e
    if info.enabled:
        error = broadcast_object(error, info)
    if error is not None:
        raise error
    return result


def book_exact_warning(impl: str, device: torch.device) -> str | None:
    """The one-line warning for a book-exact run on a device whose numbers differ from the book's, or None.

    The book's figures come from CPU (and CUDA) float32 kernels; Apple's MPS kernels round
    differently (and some ops fall back), so losses and samples drift from the printed ones.
    """
    if impl == "book" and device.type == "mps":
        return ("model.impl book on mps: losses and samples will not match the book's printed numbers "
                "(MPS kernels round differently); use train.device cpu to reproduce them")
    return None

"""gptcli train: the book's ``train_model_simple``, made durable, resumable and fast.

The loop is one flat function, top to bottom: learning rate -> forward/backward
(accumulating micro-batches) -> non-finite check -> clip -> optimizer step ->
log -> evaluate -> epoch sample -> checkpoint -> stop checks.

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
import datetime as _dt
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from gptcli import report
from gptcli.checkpoint import (
    Checkpoint,
    clean_temporaries,
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
from gptcli.documents import DocumentMasked
from gptcli.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_object,
    full_state,
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
from gptcli.model import GPTModel, flops_per_token, load_state_dict, pad_vocab, trim_vocab
from gptcli.loss import cross_entropy
from gptcli.perf import MfuMeter, peak_flops, set_host_memory
from gptcli.resolve import LOCK_FILES, clear_run, refuse_foreign
from gptcli.runs import record_end
from gptcli.tokenizer import END_OF_TEXT_ID, decode, encode

RUN_MANIFEST = "run.json"
# None: defer the non-finite check on CUDA only; tests set True to exercise it on the CPU.
DEFER_NONFINITE_CHECK: bool | None = None
LOCK, LOCK_PID = LOCK_FILES  # the run lock, and its holder's pid beside it


class Events:
    """What the loop reports; the CLI overrides these to render progress. All no-ops here."""

    def start(self, info: dict[str, Any]) -> None: ...
    def log(self, record: dict[str, Any]) -> None: ...
    def eval(self, record: dict[str, Any]) -> None: ...
    def sample(self, epoch: int, text: str) -> None: ...
    def checkpoint(self, path: Path) -> None: ...
    def warn(self, message: str) -> None: ...
    download: Progress | None = None


class Interrupted(GptcliError):
    """SIGINT/SIGTERM/SIGHUP: the current step finished, a checkpoint was saved."""

    def __init__(self, signum: int, checkpoint: Path, run_dir: Path):
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped after saving {checkpoint}; continue with: gptcli train --out {run_dir} --resume")
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint
        self.signum = signum  # run.json records the signal that stopped the run


@dataclass
class _Position:
    """Where the training stream stands: the next micro-batch to read."""

    epoch: int = 0
    windows_done: int = 0  # windows of `epoch` already consumed (global, all ranks)
    seed: int | None = None  # permutation seed of `epoch` once drawn


def train(
    cfg: Config,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    init_from: Path | None = None,
    events: Events | None = None,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Train `cfg` into `run_dir`; return a summary of the run.

    Args:
        cfg: the resolved config.
        run_dir: the run directory (checkpoints, metrics, plot, run.json).
        resume: continue from the newest valid checkpoint in `run_dir`.
        overwrite: delete an existing `run_dir` first (only a gptcli run's own files; a folder
            holding anything else is refused).
        init_from: start from these weights (continued pretraining), with a fresh optimizer.
        events: progress callbacks.
        allow_data_change: resume on a corpus whose sha256 differs from the one in run.json.

    Raises:
        InputError: bad data, config or run directory (nothing is written then).
        RunError: a non-finite loss or a failing disk.
        Interrupted: SIGINT/SIGTERM/SIGHUP after the checkpoint was written.
    """
    events = events or Events()
    t = cfg.train
    device = resolve_device(t.device)
    info = init_distributed(device)
    if info.is_main and (warning := book_exact_warning(cfg.model.impl, device)):
        events.warn(warning)
    device = process_device(device, info)
    try:
        return _train(cfg, run_dir, resume, overwrite, init_from, events, device, info, allow_data_change)
    finally:
        shutdown(info)


def _train(cfg, run_dir, resume, overwrite, init_from, events, device, info: DistInfo, allow_data_change=False):
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.host_memory != "default" and not set_host_memory(t.host_memory):
        events.warn(f"train.host_memory {t.host_memory}: not supported by this C library; ignored")
    # Rank 0 first: a missing default corpus is downloaded once, not by every process at the same time.
    splits = _on_main(info, lambda: load_splits(cfg.data, cfg.model.context_length, progress=events.download))
    if not info.is_main:
        splits = load_splits(cfg.data, cfg.model.context_length)
    _check_batches(splits, t.batch_size, info.world_size)

    # Everything that can be wrong with the inputs is checked before the run directory is touched.
    init_weights = None
    if init_from is not None:
        init_weights = load_checkpoint(init_from)
        _check_shapes(cfg, init_weights.config, f"--init-from {init_from}")
    ckpt = _find_resume(run_dir, cfg) if resume and run_dir.is_dir() else None  # every rank reads it
    if ckpt is not None:
        _check_resume(run_dir, cfg, splits, ckpt, info, allow_data_change, events)
    lock = _on_main(info, lambda: _prepare_run_dir(run_dir, resume, overwrite))
    ended: BaseException | None = None  # how the run ended, recorded in run.json for `gptcli runs`
    try:
        for reason in ckpt.skipped if ckpt is not None else []:
            events.warn(f"skipped a damaged checkpoint: {reason}")
        return _loop(cfg, run_dir, splits, ckpt, init_weights, events, device, info)
    except BaseException as e:
        ended = e
        raise
    finally:
        if lock is not None:
            record_end(run_dir, ended)
            lock.close()


def _loop(cfg: Config, run_dir: Path, splits: Splits, ckpt: Checkpoint | None, init_weights, events, device, info):
    t = cfg.train
    # Book order: seed, build the model (init draws), move it, then the optimizer.
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
    if device.type == "cuda" and cfg.model.impl == "fused":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    wrapped = wrap_model(model, t.distributed, info, device)
    optimizer = _build_optimizer(wrapped, t)
    autocast = _autocast(device, t.precision)
    # data.document_mask: attention stays within documents (documents.py); off, the book's model call.
    masked = (lambda m: DocumentMasked(m, END_OF_TEXT_ID, cfg.data.reset_positions)) if cfg.data.document_mask else (lambda m: m)
    train_module = masked(wrapped)

    def forward_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # No name for the logits: held through backward they would cost B x T x V floats
        # (400 MB at batch 8) that the loss no longer needs (it keeps its own softmax).
        with autocast():
            return cross_entropy(train_module(inputs), targets)

    if t.compile:
        # The loss is compiled with the model so that the float32 upcast, log-softmax and
        # its backward over B x T x V logits fuse into a few kernels: on an H200 at batch 32
        # that cut the GPU time of a step from 79 ms to 68 ms (the eager loss took a quarter).
        wrapped = torch.compile(wrapped)  # for evaluation (eval mode compiles its own graph)
        forward_loss = torch.compile(forward_loss)
    scorer = masked(wrapped)  # what evaluation calls

    pin = device.type == "cuda"
    sampling = cfg.data.sampling
    train_loader = make_loader(splits.train, t.batch_size, True, True, info.rank, info.world_size, "split", pin, sampling)
    # The book evaluates on its (shuffling) training loader; a separate loader keeps
    # the training epoch's position intact while drawing the same random numbers.
    train_eval_loader = make_loader(splits.train, t.batch_size, True, True, info.rank, info.world_size, "stride", pin, sampling)
    val_loader = make_loader(splits.val, t.batch_size, False, False, info.rank, info.world_size, "stride", pin)
    sampler = train_loader.batch_sampler
    per_epoch = sampler.num_batches()  # micro-batches per epoch
    global_batch = sampler.global_batch
    tokens_per_micro = global_batch * cfg.model.context_length
    total_micro = t.num_epochs * per_epoch
    total_steps = _total_steps(t, per_epoch, tokens_per_micro)

    step, tokens_seen, elapsed_before = 0, 0, 0.0
    pos = _Position()
    best_val = math.inf
    last_eval: dict[str, Any] = {}
    restore_rng: Callable[[], None] | None = None
    if ckpt is not None:
        state = ckpt.train_state
        load_full_state(wrapped, optimizer, pad_vocab(ckpt.weights, cfg.model), state["optimizer"], info)
        step, tokens_seen = state["step"], state["tokens_seen"]
        elapsed_before = state.get("elapsed_s", 0.0)
        pos = _Position(state["epoch"], state["windows_done"], state["epoch_seed"])
        best_val = state.get("best_val_loss", math.inf)
        last_eval = state.get("last_eval", {})
        if splits.sources:  # a mixture: the position in every source
            if "mixture" not in state:
                raise InputError(f"--resume {ckpt.path}: the checkpoint holds no mixture positions; data.path was not a list then")
            sampler.load_state(state["mixture"])
        rng = state["rng"]
        restore_rng = lambda: _set_rng(rng, device, info, t.seed + step)  # noqa: E731
        if pos.windows_done == 0:
            restore_rng()  # a fresh epoch: its loader draws come from the restored stream
            restore_rng = None

    flops_token = flops_per_token(cfg.model)
    mfu = _mfu_meter(t, device, events) if info.is_main else None
    metrics = report.MetricsLog(run_dir, resume_step=step) if info.is_main else None
    if info.is_main:
        _write_run_manifest(run_dir, cfg, splits, device, info, resumed_at=step if ckpt else None)
    events.start({
        "run_dir": str(run_dir), "total_steps": total_steps, "step": step, "epochs": t.num_epochs,
        "steps_per_epoch": math.ceil(per_epoch / t.grad_accum_steps), "device": str(device),
        "world_size": info.world_size, "params": model.num_params(), "train_tokens": splits.train_tokens,
        "val_tokens": splits.val_tokens, "resumed": ckpt is not None,
    })

    def check_deferred() -> None:
        if defer and int(first_bad) != 0:  # a host sync: only at log, eval and save points
            raise _nonfinite(float("nan"), int(first_bad), run_dir, last_saved_step,
                             f"its update was skipped; stopped at step {step}")

    def save(reason: str) -> Path:
        check_deferred()  # never save after a non-finite step
        model_sd, optim_sd = full_state(wrapped, optimizer)
        rng_state = _get_rng(device, info)
        path = None
        if info.is_main:
            state = {
                "optimizer": optim_sd, "step": step, "tokens_seen": tokens_seen,
                "epoch": pos.epoch, "windows_done": pos.windows_done, "epoch_seed": pos.seed,
                "rng": rng_state, "best_val_loss": best_val, "last_eval": last_eval,
                "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                **({"mixture": sampler.state()} if splits.sources else {}),
            }
            meta = {"step": step, "epoch": pos.epoch, "tokens_seen": tokens_seen, "reason": reason,
                    "val_loss": last_eval.get("val_loss"), "train_loss": last_eval.get("train_loss")}
            path = save_checkpoint(run_dir, step_dir_name(step), trim_vocab(model_sd, cfg.model), cfg, state, meta)
            point(run_dir, "latest", path)
            if best_at[0] == step:  # these are the weights of the lowest validation loss measured
                point(run_dir, "best", path)
            prune(run_dir, t.keep_last)
            events.checkpoint(path)
        barrier(info)
        return path

    def save_best() -> None:
        """RUN/best: the weights of this step, which set a new lowest validation loss (weights only)."""
        check_deferred()
        model_sd, _ = full_state(wrapped, optimizer)
        if info.is_main:
            meta = {"step": step, "epoch": epoch_number, "tokens_seen": tokens_seen, "reason": "best",
                    "val_loss": last_eval["val_loss"], "train_loss": last_eval["train_loss"]}
            save_checkpoint(run_dir, "best", trim_vocab(model_sd, cfg.model), cfg, None, meta)
        barrier(info)

    best_at = [None]  # the step whose evaluation set the lowest validation loss in this session
    reduce = all_reduce_sum if info.enabled else None
    stop = _StopSignals()
    t_start = time.perf_counter()
    t_log, tokens_at_log = t_start, tokens_seen
    last_saved_step = step if ckpt is not None else -1
    stream = _micro_batches(train_loader, pos, t.num_epochs, restore_rng)
    # Defer the non-finite check to log points where a host sync costs (CUDA) and the optimizer
    # can skip an update on the device (fused AdamW's found_inf, as AMP's GradScaler uses it).
    defer = (DEFER_NONFINITE_CHECK if DEFER_NONFINITE_CHECK is not None else device.type == "cuda") and (
        t.optimizer_impl == "fused")
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # first step with a non-finite loss
    micro_index = step * t.grad_accum_steps
    model.train()
    finished_epochs: list[int] = []  # epochs that ended during the current step
    epoch_progress = pos.epoch + pos.windows_done / (per_epoch * global_batch)
    with stop:
        while step < total_steps:
            # ---- learning rate for this step
            lr = _lr_at(step, total_steps, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # ---- forward/backward over one group of micro-batches
            group_size = min(t.grad_accum_steps, total_micro - micro_index)
            loss_sum = torch.zeros((), device=device)
            for _ in range(group_size):
                epoch, inputs, targets, windows_after, seed, epoch_done = next(stream)
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                loss = forward_loss(inputs, targets)
                (loss / group_size if group_size > 1 else loss).backward()
                loss_sum += loss.detach()
                micro_index += 1
                pos = _Position(epoch + 1, 0, None) if epoch_done else _Position(epoch, windows_after, seed)
                epoch_progress = epoch + windows_after / (per_epoch * global_batch)
                if epoch_done:
                    finished_epochs.append(epoch)
            epoch_number = math.floor(epoch_progress - 1e-9) + 1  # 1-based epoch of the last batch
            loss_dev = loss_sum / group_size if group_size > 1 else loss_sum
            log_now = step + 1 == 1 or (step + 1) % t.log_every == 0 or step + 1 == total_steps
            if not defer or log_now:
                # ---- non-finite check before the optimizer step (a host sync: free on CPU)
                loss_value = loss_dev.item()
                if reduce is not None:
                    loss_value = reduce([loss_value])[0] / info.world_size
                if not math.isfinite(loss_value):
                    raise _nonfinite(loss_value, step + 1, run_dir, last_saved_step, "stopped before the optimizer step")
            else:
                # ---- no host sync between log points: a non-finite loss makes the fused AdamW
                # skip this update on the device; the step is reported at the next check.
                bad = (~torch.isfinite(loss_dev)).float()
                if info.enabled:
                    torch.distributed.all_reduce(bad)  # every rank skips, or none
                optimizer.found_inf = bad
                first_bad = torch.where((bad > 0) & (first_bad == 0), step + 1, first_bad)
            grad_norm = None
            if t.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.found_inf = None
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += group_size * tokens_per_micro
            if defer and (log_now or (step - 1) % t.eval_freq == 0):
                check_deferred()

            # ---- log
            now = time.perf_counter()
            if info.is_main and log_now:
                grad_norm = float(grad_norm) if grad_norm is not None else None
                rate = (tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
                record = {
                    "event": "train", "step": step, "epoch": epoch_number,
                    "tokens_seen": tokens_seen, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": rate, "mfu": mfu(flops_token * rate / info.world_size),
                    "elapsed_s": elapsed_before + now - t_start,
                }
                metrics.write(record)
                events.log(record)
                t_log, tokens_at_log = now, tokens_seen
            # ---- evaluate (the book: after the first step and every eval_freq steps; we also
            # evaluate the final weights, which the book does not)
            t_pause = time.perf_counter()
            final = step == total_steps and (step - 1) % t.eval_freq != 0
            if (step - 1) % t.eval_freq == 0 or final:
                # The final evaluation leaves the RNG as it found it: its training-loader draws
                # would otherwise change what a run extended by --resume trains on.
                rng_before = _get_rng(device, info) if final else None
                train_eval = evaluate_loss(scorer, train_eval_loader, device, t.eval_iter, autocast, reduce)
                by_source = _source_losses(scorer, splits, t, info, pin, device, autocast, reduce)
                if by_source:  # a mixture: the overall loss weighs each source's as the mixture does
                    val_eval = {"loss": sum(w * by_source[n] for n, w, _ in splits.sources) / sum(w for _, w, _ in splits.sources)}
                else:
                    val_eval = evaluate_loss(scorer, val_loader, device, t.eval_iter, autocast, reduce)
                if rng_before is not None:
                    _set_rng(rng_before, device, info, t.seed + step)
                last_eval = {
                    "event": "eval", "step": step, "epoch": epoch_number, "epoch_progress": epoch_progress,
                    "tokens_seen": tokens_seen, "train_loss": train_eval["loss"], "val_loss": val_eval["loss"],
                    "lr": lr, "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                    **({"final": True} if final else {}),
                    **({"val_loss_by_source": by_source} if by_source else {}),
                }
                if info.is_main:
                    metrics.write(last_eval)
                    events.eval(last_eval)
                    report.render(run_dir)
                if math.isfinite(val_eval["loss"]) and val_eval["loss"] < best_val:
                    best_val, best_at[0] = val_eval["loss"], step
                    if not (step == total_steps or (t.save_every and step % t.save_every == 0)):
                        save_best()  # no step checkpoint will hold these weights
            # ---- a greedy sample after each epoch, as the book prints
            for epoch in finished_epochs:
                if t.sample_tokens > 0:
                    events.sample(epoch + 1, _sample(model, cfg, t.start_context, t.sample_tokens))
            finished_epochs.clear()
            model.train()
            # ---- checkpoint and stop checks
            interrupted = stop.signum is not None
            if reduce is not None:  # ranks must agree, or one would save while another steps on
                # (a host sync: with deferred checks only at log points, where one happens anyway)
                interrupted = reduce([float(interrupted)])[0] > 0 if (not defer or log_now) else False
            if step == total_steps or interrupted or (t.save_every and step % t.save_every == 0):
                path = save("interrupt" if interrupted else "end" if step == total_steps else "cadence")
                last_saved_step = step
                if interrupted:
                    raise Interrupted(stop.signum or signal.SIGTERM, path, run_dir)
            t_log += time.perf_counter() - t_pause  # throughput counts training time only
    if last_saved_step != step:
        save("end")
    if info.is_main:
        metrics.close()
        report.render(run_dir)
    elapsed = elapsed_before + time.perf_counter() - t_start
    return {
        "run_dir": str(run_dir), "steps": step, "tokens_seen": tokens_seen, "epochs_completed": pos.epoch,
        "train_loss": last_eval.get("train_loss"), "val_loss": last_eval.get("val_loss"),
        "best_val_loss": best_val if math.isfinite(best_val) else None,
        "checkpoint": str(run_dir / step_dir_name(step)), "elapsed_s": elapsed,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else None,
    }


def _source_losses(model, splits: Splits, t, info, pin, device, autocast, reduce) -> dict[str, float]:
    """Validation loss of each source of a mixture ({} for a single corpus)."""
    out = {}
    for name, _, windows in splits.sources:
        loader = make_loader(windows, t.batch_size, False, False, info.rank, info.world_size, "stride", pin)
        out[name] = evaluate_loss(model, loader, device, t.eval_iter, autocast, reduce)["loss"]
    return out


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


def _build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """AdamW as the book builds it; optionally no decay on biases and norms (GPT-2 practice)."""
    kwargs: dict[str, Any] = {"lr": t.learning_rate, "betas": (t.beta1, t.beta2), "weight_decay": t.weight_decay}
    if t.optimizer_impl == "foreach":
        kwargs["foreach"] = True
    elif t.optimizer_impl == "fused":
        kwargs["fused"] = True
    params = [p for p in model.parameters() if p.requires_grad]
    if t.decay_matrices_only:
        params = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW(params, **kwargs)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _mfu_meter(t, device: torch.device, events: Events) -> MfuMeter:
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    if t.peak_flops is not None:
        return MfuMeter(device, dtype, t.peak_flops, measured=False, warn=events.warn)
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
                  allow_data_change: bool, events) -> None:
    """Refuse a resume that cannot continue the saved epoch exactly; say when the run is already done.

    The epoch's position is a count of windows in batches of the saved global batch over the saved
    corpus: another process count or another number of windows would skip or repeat windows.
    """
    import json

    try:
        manifest = json.loads((run_dir / RUN_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    runs = [manifest] + list(manifest.get("resumes") or [])
    world = next((r["world_size"] for r in reversed(runs) if isinstance(r.get("world_size"), int)), info.world_size)
    saved_batch, batch = ckpt.config.train.batch_size, cfg.train.batch_size
    if world * saved_batch != info.world_size * batch:
        raise InputError(
            f"--resume: train.batch_size {batch} x {info.world_size} process(es) is a global batch of "
            f"{info.world_size * batch} windows; the run's is {saved_batch} x {world} = {world * saved_batch}, and its "
            f"position in the epoch counts those: keep the global batch (e.g. --batch-size {saved_batch} with "
            f"--nproc {world})")
    corpus = manifest.get("corpus") or {}
    if corpus.get("sha256") and corpus["sha256"] != splits.sha256:
        if not allow_data_change:
            raise InputError(f"--resume: data.path {splits.source} (sha256 {splits.sha256[:12]}) is not the corpus "
                             f"this run trained on ({corpus.get('path')}, sha256 {corpus['sha256'][:12]}); "
                             "pass --allow-data-change to continue on it")
        old = corpus.get("train_tokens")
        ctx, stride = cfg.model.context_length, cfg.data.stride or cfg.model.context_length
        if isinstance(old, int) and len(range(0, max(old - ctx, 0), stride)) != len(splits.train):
            raise InputError(f"--allow-data-change: the training split of {splits.source} has {len(splits.train)} "
                             f"windows, the run's corpus had {len(range(0, max(old - ctx, 0), stride))}; the epoch "
                             "position cannot carry over (start a new run with --init-from instead)")
    per_epoch = len(splits.train) // (cfg.train.batch_size * info.world_size)  # the loader drops a partial batch
    total = _total_steps(cfg.train, per_epoch, cfg.train.batch_size * info.world_size * cfg.model.context_length)
    step = ckpt.train_state["step"]
    if step >= total:
        events.warn(f"{run_dir}: the run already finished at step {step}; nothing to train. To extend it, "
                    f"resume with --max-steps N or --num-epochs N beyond it (now {cfg.train.num_epochs} epoch(s)"
                    f"{f', max_steps {cfg.train.max_steps}' if cfg.train.max_steps else ''})")


def _check_batches(splits: Splits, batch_size: int, world_size: int) -> None:
    need = batch_size * world_size
    if len(splits.train) < need:
        raise InputError(
            f"{splits.source}: the training split has {len(splits.train)} window(s) "
            f"({splits.train_tokens} tokens); batch_size {batch_size} x {world_size} process(es) needs {need}"
        )


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
        raise InputError(f"--resume: no complete checkpoint in {run_dir}{why}")
    ckpt = load_checkpoint(latest, with_train_state=True)
    ckpt.skipped = skipped
    _check_shapes(cfg, ckpt.config, f"--resume {latest}")
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


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool):
    """Check the run directory, create it, take its lock; returns the open lock file.

    Only a gptcli run (recognised by its own files, see resolve.foreign_entries) is ever
    continued or cleared: a folder holding anything else is refused, and nothing is deleted.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: exists and is not a directory")
    refuse_foreign(run_dir)
    existing = run_dir.is_dir() and any(p.name not in LOCK_FILES for p in run_dir.iterdir())
    if resume and not existing:
        raise InputError(f"--resume: {run_dir} has no checkpoint to resume from")
    if existing and not resume and not overwrite:
        raise InputError(f"{run_dir}: a gptcli run exists there; pass --resume to continue it or --overwrite "
                         "to start it over")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".tmp-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{run_dir}: output directory is not writable ({e.strerror})") from None
    lock = _lock(run_dir)
    if overwrite and not resume:
        clear_run(run_dir)
    clean_temporaries(run_dir)
    return lock


def _lock(run_dir: Path) -> "_RunLock":
    """An exclusive lock on RUN/.lock, our pid in RUN/.lock.pid; the OS drops the lock when the holder dies.

    Through ``filelock`` (flock on POSIX, LockFileEx on Windows). The pid lives in a side
    file because a locked file cannot be read on Windows and filelock truncates its own.
    """
    import filelock

    lock = filelock.FileLock(str(run_dir / LOCK), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        try:
            holder = (run_dir / LOCK_PID).read_text(encoding="utf-8").strip() or "another process"
        except OSError:
            holder = "another process"
        raise RunError(f"{run_dir}: in use by gptcli train (pid {holder}); wait for it or choose another --out") from None
    (run_dir / LOCK_PID).write_text(str(os.getpid()), encoding="utf-8")
    return _RunLock(lock)


class _RunLock:
    """The held run lock; close() releases it."""

    def __init__(self, lock):
        self._lock = lock

    def close(self) -> None:
        self._lock.release()


def _write_run_manifest(run_dir: Path, cfg: Config, splits: Splits, device, info: DistInfo, resumed_at) -> None:
    import json

    path = run_dir / RUN_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError):
        manifest = {}
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if resumed_at is None or not manifest:
        manifest = {
            "started": now,
            "command": sys.argv,
            "config_source": cfg.source,
            "git_commit": _git_commit(),
            "versions": _versions(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "world_size": info.world_size,
            "corpus": {"path": splits.source, "sha256": splits.sha256,
                       "train_tokens": splits.train_tokens, "val_tokens": splits.val_tokens},
            "resumes": [],
        }
    else:
        manifest.setdefault("resumes", []).append({"at_step": resumed_at, "time": now, "command": sys.argv,
                                                   "device": str(device), "world_size": info.world_size})
    manifest.update(state="running", ended_at=None)  # until record_end says how it ended
    tmp = path.with_name(f".tmp-run-{os.getpid()}.json")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("gptcli", "torch", "tiktoken", "numpy", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# Signals that save and stop: Ctrl-C, kill/SLURM/Kubernetes, a closed terminal or ssh session.
# Windows has no SIGHUP: a signal this platform lacks is skipped.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class _StopSignals:
    """Turn the first SIGINT/SIGTERM/SIGHUP into a flag the loop checks after each step.

    A second SIGINT stops at once (KeyboardInterrupt); the checkpoints already on
    disk stay valid because every write is atomic.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading_main():
            for name in STOP_SIGNALS:
                s = getattr(signal, name, None)
                if s is None:
                    continue
                try:
                    self._old[s] = signal.signal(s, self._handle)
                except (OSError, ValueError, RuntimeError):  # a signal this platform cannot handle
                    continue
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        return False


def book_exact_warning(impl: str, device: torch.device) -> str | None:
    """The one-line warning for a book-exact run on a device whose numbers differ from the book's, or None.

    The book's figures come from CPU (and CUDA) float32 kernels; Apple's MPS kernels round
    differently (and some ops fall back), so losses and samples drift from the printed ones.
    """
    if impl == "book" and device.type == "mps":
        return ("model.impl book on mps: losses and samples will not match the book's printed numbers "
                "(MPS kernels round differently); use --device cpu to reproduce them")
    return None


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

"""gptcli plan: what a config costs before it runs (parameters, FLOPs, steps, memory, time); trains nothing.

Memory per device (per process) of one training step, in four parts:

- weights, gradients: one float32 copy each of every parameter (bf16 autocast keeps float32 weights);
  with ``train.optimizer_in_backward`` each gradient is freed as soon as
  its parameter is stepped, so only the largest parameter's gradient counts;
- optimizer state: AdamW's two float32 moments per parameter;
- activations: what autograd keeps for backward, counted exactly under ``saved_tensors_hooks``
  (every tensor saved for backward seen, its storage counted once, parameters left out) over
  forwards of the model cut to one and two blocks at one and two windows, on the device itself,
  and extended to the full depth and batch (see ``_activations``). With activation checkpointing
  the forward keeps only each block's input, and backward holds one block's activations again
  while it recomputes it.
- transients: the largest buffers that live only for a moment and sit on top of the above at the
  step's peak. The plain loss (``train.loss_chunk: 0``, and book-exact runs): the logits and their
  log-softmax (B x T x V floats each) in forward, their gradients in backward. The chunked loss
  (``train.loss_chunk`` auto or N, the default outside book-exact runs): one slice's float32
  logits (rows x V; with bf16/fp16 also the slice's low-precision copy and the head's weight cast
  once); its gradients for the head and the hidden states are kept for backward, so the
  activations count them.

The step is the one training runs: the same loss function (``loss.training_loss`` with the
resolved ``train.loss_chunk``), the same precision (``train.precision``, auto resolved for the
device) and the document mask when ``data.document_mask`` is on.

The largest batch that fits solves that linear function of the batch size for the device's memory
(CUDA: the device's total; CPU: MemAvailable; or ``--memory-limit``). ``measure_peak`` runs real
steps in a fresh process and reports the peak (CUDA: max allocated; CPU: the growth of the
process's peak RSS), under a limit when one is given (CUDA: ``set_per_process_memory_fraction``,
a real out-of-memory; CPU: the measured peak compared with the limit, as the CPU cannot enforce
a limit on resident memory); tests and ``--verify`` use it to check the estimate.

Library code: nothing here prints or exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from gptcli.config import Config, config_from_dict
from gptcli.errors import InputError, RunError, first_line
from gptcli.hostmem import set_host_memory

FLOAT32 = 4
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, float32 each
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
         "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str, what: str = "--memory-limit") -> int:
    """'512MB', '2GiB', '1.5g', '1000000' -> bytes (binary units: 1 GB = 2**30 bytes, as nvidia-smi counts).

    Raises:
        InputError: not a positive size, naming `what`.
    """
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num) * UNITS[unit]
    except (ValueError, KeyError):
        raise InputError(f"{what} {text!r}: not a size (e.g. 512MB, 16GB)") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{what} {text!r}: must be a positive size")
    return int(value)


@dataclass
class Memory:
    """Bytes of one training step at `batch` windows: fixed parts, activations linear in the batch, transients.

    The peak is not the sum of all parts: gradients (set to None after each step) appear in
    backward as the activations they replace are freed, so the start of backward holds all
    activations and the loss's transients and hardly any gradient; the optimizer step holds
    every gradient with the weights and moments (with ``train.optimizer_in_backward``, only the
    largest parameter's: `gradients` counts that). peak = weights + optimizer +
    max(activations + transients, gradients).
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int  # at `batch`
    activations_checkpointed: int
    transients: int  # at `batch`
    activations_per_window: int  # one more window's activations (no checkpointing)
    activations_per_window_checkpointed: int
    batch: int
    transients_at: Callable[[int], int] = dataclasses.field(repr=False, compare=False, default=None)

    def peak(self, checkpointed: bool = False) -> int:
        return self.peak_at(self.batch, checkpointed)

    def peak_at(self, batch: int, checkpointed: bool = False) -> int:
        """The peak at another batch size: activations extended linearly, transients as the loss slices them."""
        act, per = ((self.activations_checkpointed, self.activations_per_window_checkpointed) if checkpointed
                    else (self.activations, self.activations_per_window))
        transients = self.transients_at(batch) if self.transients_at else self.transients
        return self.weights + self.optimizer + max(act + per * (batch - self.batch) + transients, self.gradients)

    @property
    def per_window(self) -> int:
        """What one more window adds to the peak's activations and transients (no checkpointing)."""
        return self.peak_at(self.batch + 1) - self.peak()

    def largest_batch(self, limit: int, checkpointed: bool = False) -> int:
        """The largest batch size whose peak is within `limit` bytes (0: not even one window).

        The peak grows with the batch (activations linearly, the chunked loss's slice in steps),
        so a doubling search then a bisection find it exactly under the model.
        """
        per = self.activations_per_window_checkpointed if checkpointed else self.activations_per_window
        if per <= 0 or self.weights + self.optimizer + self.gradients > limit or self.peak_at(1, checkpointed) > limit:
            return 0
        lo, hi = 1, 2
        while self.peak_at(hi, checkpointed) <= limit:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak_at(mid, checkpointed) <= limit else (lo, mid)
        return lo

    def to_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "activations_checkpointed": self.activations_checkpointed,
                "transients": self.transients, "peak": self.peak(), "peak_checkpointed": self.peak(True)}


def _training_loss(cfg: Config):
    """loss(model, x, y) as the training step computes it: train.loss_chunk resolved (one process),
    the document mask when data.document_mask."""
    from gptcli.distributed import DistInfo
    from gptcli.documents import as_trained
    from gptcli.loss import training_loss
    from gptcli.train import _loss_chunk

    chunk = _loss_chunk(cfg, DistInfo())

    def loss(model, x, y):
        return training_loss(as_trained(model, cfg.data), model.out_head.weight, x, y, cfg.model.vocab_size, chunk)

    return loss, chunk


def _saved_bytes(cfg: Config, device, layers: int, batch: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward over one forward + loss of `cfg` cut to `layers` blocks, at `batch`."""
    import torch

    from gptcli.model import GPTModel
    from gptcli.train import _autocast

    model = GPTModel(dataclasses.replace(cfg.model, n_layers=layers)).to(device)
    model.train()
    model.activation_checkpointing = checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()  # kept alive by the graph until backward: its address is its identity
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    idx = torch.zeros((batch, cfg.model.context_length), dtype=torch.long, device=device)
    training_loss, _ = _training_loss(cfg)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(device, cfg.train.precision)():
        loss = training_loss(model, idx, idx)
    del loss, model
    return sum(seen.values())


def _activations(cfg: Config, device, batch: int, checkpointing: bool) -> tuple[int, int, int, int]:
    """(saved bytes at `batch`, bytes per extra window, one block's bytes at `batch`, one block's per window).

    What a forward keeps is c0 + b*c1 + l*c2 + l*b*c3 for l blocks and b windows (the embeddings,
    head and loss, and each block, each part fixed or per window): four forwards of one and two
    blocks at one and two windows, on the device itself (its kernels decide what they keep: flash
    attention a log-sum-exp, the CPU's explicit attention its weights), give the four terms exactly.
    """
    s11, s21 = _saved_bytes(cfg, device, 1, 1, checkpointing), _saved_bytes(cfg, device, 2, 1, checkpointing)
    s12, s22 = _saved_bytes(cfg, device, 1, 2, checkpointing), _saved_bytes(cfg, device, 2, 2, checkpointing)
    c3 = s22 - s21 - s12 + s11
    c2, c1 = s21 - s11 - c3, s12 - s11 - c3
    c0 = s11 - c1 - c2 - c3
    n = cfg.model.n_layers
    return c0 + batch * c1 + n * (c2 + batch * c3), c1 + n * c3, c2 + batch * c3, c3


def estimate_memory(cfg: Config, batch: Optional[int] = None) -> Memory:
    """The memory of one training step of `cfg` at `batch` windows per process (default train.batch_size)."""
    import torch

    from gptcli.device import resolve_device
    from gptcli.model import GPTModel

    batch = batch or cfg.train.batch_size
    device = resolve_device(cfg.train.device)
    with torch.device("meta"):
        model = GPTModel(cfg.model)
    param_bytes = sum(p.numel() for p in model.parameters()) * FLOAT32
    gradient_bytes = max(p.numel() for p in model.parameters()) * FLOAT32 if _in_backward(cfg, device) else param_bytes
    with _one_window_fits(cfg, f"the model at one window does not fit {device}"):  # real forwards of 1 and 2 windows
        plain, per, block, block_per = _activations(cfg, device, batch, False)
        kept, per_kept, _, _ = _activations(cfg, device, batch, True)
    # backward holds one block's activations again while it recomputes it
    checkpointed, per_checkpointed = kept + block, per_kept + block_per
    transients_at = _loss_transients(cfg, device, model.out_head.out_features)
    return Memory(param_bytes, gradient_bytes, ADAM_MOMENTS * param_bytes, plain, checkpointed, transients_at(batch),
                  per, per_checkpointed, batch, transients_at)


@contextlib.contextmanager
def _one_window_fits(cfg: Config, what: str) -> Iterator[None]:
    """Turn an allocation that cannot be made (a context so long that one window, or the book's T x T causal
    mask, exceeds the device or even a tensor's size) into one line naming the key, not an internal error.

    Raises:
        RunError: the model at one window cannot be allocated (`what` says where).
    """
    import torch

    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "allocate" not in str(e) and "overflow" not in str(e):
            raise
        raise RunError(f"model.context_length {cfg.model.context_length} (from {cfg.origin('model.context_length')}): "
                       f"{what} ({first_line(e)}); this config cannot train here at any batch size") from None


def _in_backward(cfg: Config, device) -> bool:
    """Whether training `cfg` (one process) steps the optimizer inside backward (train.optimizer_in_backward)."""
    from gptcli.distributed import DistInfo
    from gptcli.precision import resolve_precision
    from gptcli.train import _defer_check, _in_backward as applies

    precision = resolve_precision(cfg.train.precision, device)[0]
    return applies(cfg.train, DistInfo(), precision, _defer_check(None, cfg.train, device, precision))


def _loss_transients(cfg: Config, device, padded_vocab: int) -> Callable[[int], int]:
    """Bytes of the loss's short-lived buffers at a batch size (see the module's docstring)."""
    from gptcli.loss import chunk_rows
    from gptcli.precision import resolve_precision

    t = cfg.model.context_length
    _, chunk = _training_loss(cfg)
    if not chunk:  # the log-softmax's gradient and the logits' gradient (B x T x V float32 each)
        return lambda batch: 2 * batch * t * padded_vocab * FLOAT32
    low = resolve_precision(cfg.train.precision, device)[0] in ("bf16", "fp16")
    per_row = padded_vocab * (FLOAT32 + (2 if low else 0))  # float32 logits (+ the slice's 16-bit copy)
    fixed = padded_vocab * cfg.model.emb_dim * 2 if low else 0  # the head's weight, cast once
    return lambda batch: fixed + min(chunk_rows(chunk, batch * t), batch * t) * per_row


def device_memory(device_name: str) -> tuple[int, str]:
    """(bytes a training process may use on the device, where that figure comes from)."""
    import torch

    from gptcli.device import resolve_device

    device = resolve_device(device_name)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name} total memory"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "the host's available memory (MemAvailable)"
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, "the host's physical memory"


def measure_peak(cfg: Config, batch: int, steps: int = 2, limit: Optional[int] = None, timeout: float = 1800,
                 host_memory: str = "return") -> dict[str, Any]:
    """Run `steps` real training steps of `cfg` at `batch` in a fresh process; its peak memory for them.

    Returns {"peak": bytes of the training state at its peak, "fits": bool, "seconds_per_step": float,
    "base": bytes the process held before the steps}; with `steps` 0 only "base".
    On CUDA `limit` is enforced (an out-of-memory is "fits": False); on the CPU the peak is compared with it.

    Raises:
        RunError: the process failed otherwise.
    """
    job = {"config": cfg.to_dict(), "batch": batch, "steps": steps, "limit": limit, "host_memory": host_memory}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", "from gptcli.plan import _measure_child; _measure_child()"],
                          input=json.dumps(job), capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode < 0:  # killed: on the CPU most likely by the kernel's out-of-memory killer
        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else -proc.returncode
        raise RunError(f"the memory probe at batch {batch} was killed by {name}"
                       + (" (out of memory?)" if name == "SIGKILL" else ""))
    if proc.returncode != 0:
        raise RunError(f"the memory probe at batch {batch} failed: "
                       f"{(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if limit is not None and "fits" not in result:
        result["fits"] = result["peak"] <= limit
    return result


def _warm_up(cfg: Config, device) -> None:
    """One step of a very small model of the same kind: loads the code and kernels a step uses."""
    import gc

    import torch

    from gptcli.loss import cross_entropy
    from gptcli.model import GPTModel
    from gptcli.train import _build_optimizer

    small = dataclasses.replace(cfg.model, vocab_size=64, context_length=8, emb_dim=cfg.model.n_heads * 4, n_layers=1)
    model = GPTModel(small).to(device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    optimizer = _build_optimizer(model, cfg.train)
    x = torch.zeros((1, 8), dtype=torch.long, device=device)
    cross_entropy(model(x), x).backward()
    optimizer.step()
    del model, optimizer
    gc.collect()


def _rss_now() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_rss_peak() -> None:
    """Start the process's peak RSS (VmHWM) afresh at its current RSS (Linux 4.0+; else it only rises)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _rss_peak() -> int:
    """The peak RSS of this process's memory (VmHWM: unlike getrusage's ru_maxrss, not carried over
    from the parent through fork and exec, which made a probe started by a large process read high)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RunError("/proc/self/status: no VmHWM; the CPU memory probe needs Linux")


def _measure_child() -> None:
    """The probe process of `measure_peak`: job on stdin, one JSON line on stdout."""
    import torch

    from gptcli.device import resolve_device
    from gptcli.model import GPTModel
    from gptcli.optim import step_in_backward
    from gptcli.train import _autocast, _build_optimizer

    job = json.loads(sys.stdin.read())
    cfg = config_from_dict(job["config"], "plan probe")
    t, batch, limit = cfg.train, job["batch"], job["limit"]
    device = resolve_device(t.device)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.model.vocab_size, (batch, cfg.model.context_length), generator=gen).to(device)
    y = torch.randint(cfg.model.vocab_size, (batch, cfg.model.context_length), generator=gen).to(device)
    cuda = device.type == "cuda"
    _warm_up(cfg, device)  # code pages and kernel caches the first step loads are not training state
    if job["steps"] == 0:  # the baseline: what a training process holds besides its steps
        from gptcli.report import load_plotting
        from gptcli.tokenizer import encode

        encode("the tokenizer's tables")  # training tokenizes its corpus
        load_plotting()  # and draws its loss plot at each evaluation
        print(json.dumps({"base": _rss_now()}))
        return
    if not cuda and job.get("host_memory", "return") != "default":
        # "return": every buffer from 1 MiB on is its own mapping, so the peak RSS is what the step holds
        set_host_memory(job.get("host_memory", "return"))
    if cuda:
        torch.cuda.synchronize(device)
        if limit is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (limit + torch.cuda.memory_allocated(device)) / total), device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _reset_rss_peak()
        base = _rss_now()
    try:
        model = GPTModel(cfg.model).to(device)
        model.activation_checkpointing = t.activation_checkpointing
        model.train()
        optimizer = _build_optimizer(model, t)
        in_backward = _in_backward(cfg, device)
        if in_backward:
            step_in_backward(model.parameters(), optimizer)
        autocast = _autocast(device, t.precision)
        training_loss, _ = _training_loss(cfg)
        times = []
        for _ in range(job["steps"]):
            start = time.perf_counter()
            with autocast():
                loss = training_loss(model, x, y)
            loss.backward()  # with optimizer_in_backward, this steps too
            if not in_backward:
                if t.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        print(json.dumps({"peak": None, "fits": False}))
        return
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _rss_peak()) - base
    per_step = min(times[1:] or times)  # the first step allocates the optimizer state and warms up kernels
    print(json.dumps({"peak": peak, "seconds_per_step": per_step, "base": base,
                      **({"fits": True} if cuda and limit else {})}))


def plan_run(cfg: Config, memory_limit: Optional[int] = None, probe_steps: int = 2, verify: bool = False,
             baseline: Optional[int] = None) -> dict[str, Any]:
    """What training `cfg` will take, without training: the figures of `gptcli plan`.

    Args:
        cfg: the resolved config (as train gets it).
        memory_limit: bytes one process may use (default: the device's memory).
        probe_steps: real steps timed in a fresh process for the time estimate (0: none).
        verify: also run a real step at the largest batch that fits and at one more, under the limit.
        baseline: CPU: bytes a training process holds besides the step (Python, PyTorch, the
            kernels of a first step), taken off the limit; default: measured in a fresh process
            (`measure_peak` with no steps). Ignored on CUDA, whose limit is the device's own memory.

    Returns:
        {"params", "flops_per_token", "data" (tokens per epoch, steps), "memory", "device_memory",
        "fits", "largest_batch", "time", "notes"}.

    Raises:
        InputError: `verify` on the CPU where its step past the limit would not fit the host's
            available memory (the CPU cannot stop a process at a limit).
    """
    import torch

    from gptcli.data import load_splits
    from gptcli.device import resolve_device
    from gptcli.model import GPTModel, flops_per_token
    from gptcli.resolve import corpus_available
    from gptcli.train import _total_steps

    t, m = cfg.train, cfg.model
    notes: list[str] = []
    with _one_window_fits(cfg, "the book's T x T causal mask is larger than a tensor can be"), torch.device("meta"):
        params = GPTModel(m).num_params()
    out: dict[str, Any] = {"params": params, "flops_per_token": flops_per_token(m), "batch_size": t.batch_size,
                           "context_length": m.context_length}
    steps = None
    if corpus_available(cfg):
        splits = load_splits(cfg.data, m.context_length)
        per_epoch = len(splits.train) // t.batch_size  # micro-batches; the loader drops a partial batch
        tokens_per_micro = t.batch_size * m.context_length
        steps = _total_steps(t, per_epoch, tokens_per_micro)
        # accumulation runs across epochs: the last step may hold fewer micro-batches than grad_accum_steps
        micro = min(steps * t.grad_accum_steps, t.num_epochs * per_epoch)
        out["data"] = {"train_tokens": splits.train_tokens, "tokens_per_epoch": per_epoch * tokens_per_micro,
                       "steps_per_epoch": math.ceil(per_epoch / t.grad_accum_steps), "epochs": t.num_epochs,
                       "steps": steps, "tokens": micro * tokens_per_micro}
    else:
        notes.append(f"data.path {cfg.data.path}: not on disk; tokens per epoch and steps unknown (nothing downloaded)")
    cpu = resolve_device(t.device).type != "cuda"
    if not cpu:
        baseline = 0
    elif baseline is None:
        baseline = measure_peak(cfg, t.batch_size, steps=0)["base"]
    mem = estimate_memory(cfg)
    if memory_limit is None:
        total, where = device_memory(t.device)
    else:
        total, where = memory_limit, "--memory-limit"
    limit = max(total - baseline, 0)  # what the step itself may hold
    fits = mem.peak(t.activation_checkpointing) <= limit
    out["memory"] = mem.to_dict()
    out["device_memory"] = {"bytes": total, "source": where, "process_baseline": baseline, "for_the_step": limit}
    out["fits"] = fits
    out["largest_batch"] = {"plain": mem.largest_batch(limit),
                            "activation_checkpointing": mem.largest_batch(limit, checkpointed=True)}
    if cpu and baseline:
        notes.append(f"the process's own memory besides the step (Python, PyTorch: {_gib(baseline)}, measured) "
                     f"is taken off {where} {_gib(total)}")
    if not fits:
        best = out["largest_batch"]["activation_checkpointing" if t.activation_checkpointing else "plain"]
        hint = f"--batch-size {best} (with train.grad_accum_steps for the same global batch)" if best else \
            "a smaller model or context"
        if not t.activation_checkpointing and mem.peak(True) <= limit:
            hint = "train.activation_checkpointing=true, or " + hint
        notes.append(f"will not fit: the step's peak {_gib(mem.peak(t.activation_checkpointing))} exceeds "
                     f"the {_gib(limit)} left of {where} {_gib(total)}; try {hint}")
    out["time"] = None
    if probe_steps > 0 and fits:
        probe = measure_peak(cfg, t.batch_size, steps=probe_steps + 1)
        per_step = probe["seconds_per_step"] * t.grad_accum_steps
        out["time"] = {"seconds_per_step": per_step, "source": f"{probe_steps} measured step(s), excluding evaluation",
                       "total_s": per_step * steps if steps is not None else None}
        out["measured_peak"] = probe["peak"]
    if verify:
        checkpointed = t.activation_checkpointing
        b = out["largest_batch"]["activation_checkpointing" if checkpointed else "plain"]
        if cpu:
            _check_host_room(mem.peak_at(b + 1, checkpointed) + baseline, b + 1)
        out["verify"] = [{"batch": n, **measure_peak(cfg, n, limit=limit)} for n in (b, b + 1) if n > 0]
    out["notes"] = notes
    return out


def _check_host_room(needed: int, batch: int) -> None:
    """Refuse a CPU probe that would not fit the host's available memory: the CPU cannot stop a
    process at a limit, so a probe past it takes memory until the kernel kills something."""
    available, _ = device_memory("cpu")
    if needed > 0.9 * available:
        raise InputError(f"--verify: its step at batch {batch} needs about {_gib(needed)}, more than 90 % of the host's "
                         f"available memory ({_gib(available)}); the CPU cannot hold a process to a limit, so that "
                         f"step would exhaust the host: give a --memory-limit well below {_gib(available)}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"

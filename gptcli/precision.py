"""Mixed precision for training: which dtype (``train.precision``), autocast, fp16 loss scaling.

``auto`` picks bf16 where the device computes it natively, fp16 with a gradient scaler
on CUDA GPUs without bf16 (T4, V100: nanoGPT #84, #215), float32 elsewhere. Native bf16
on a CPU means AVX512-BF16 or AMX-BF16 instructions; they are read from the ISA PyTorch
dispatches to and from /proc/cpuinfo's flags, never guessed from the vendor. Weights,
gradients and optimizer state stay float32 in every mode; autocast computes the matmuls
in the low-precision dtype.

fp16 overflows (range up to 65504) where bf16 does not: the loss is multiplied by a scale
before backward (``torch.amp.GradScaler``), the gradients divided by it before clipping
and the step; a step whose loss or gradients are non-finite is an *overflow*: the update
is skipped and the scale halved, and the run goes on. Only when the scale has fallen to
``MIN_SCALE`` does a non-finite loss stop the run as in float32 (scaling cannot help then:
the model itself diverged).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from gptcli.device import cpu_info
from gptcli.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 matmul units
MIN_SCALE = 1.0  # below this a non-finite loss is the model's, not fp16's range


def cpu_bf16_native() -> str | None:
    """The CPU feature that computes bf16 natively (e.g. "amx_bf16"), or None (bf16 would be emulated)."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()  # the ISA PyTorch's kernels dispatch to
    except (AttributeError, RuntimeError):
        capability = ""
    if "AMX" in capability.upper():
        return "amx_bf16"
    present = set(cpu_info().get("flags", "").split())
    return next((flag for flag in CPU_BF16_FLAGS[::-1] if flag in present), None)


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str | None]:
    """The precision to train in and, when `precision` is auto, a one-line note saying why.

    Raises:
        InputError: naming train.precision, for a dtype this device cannot train in.
    """
    if precision not in PRECISIONS:
        raise InputError(f"train.precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.type == "cuda"
    cuda_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        if cuda:
            name = torch.cuda.get_device_name(device)
            chosen, why = ("bf16", f"{name} computes bf16") if cuda_bf16 else (
                "fp16", f"{name} has no bf16 units; fp16 with a gradient scaler")
        elif device.type == "cpu":
            feature = cpu_bf16_native()
            chosen, why = ("bf16", f"the CPU has {feature}") if feature else ("fp32", "the CPU has no bf16 units")
        else:
            chosen, why = "fp32", f"no low-precision training on {device.type} by default"
        return chosen, f"train.precision auto: {chosen} ({why})"
    if precision == "bf16" and cuda and not cuda_bf16:
        raise InputError(f"train.precision bf16: {torch.cuda.get_device_name(device)} does not compute bf16; "
                         "use fp16 (with a gradient scaler), fp32 or auto")
    if precision == "fp16" and device.type not in ("cuda", "cpu"):
        raise InputError(f"train.precision fp16: not supported on {device.type}; use fp32 or bf16")
    return precision, None


def autocast(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for `precision` (float32: a null context; auto is resolved first)."""
    if precision == "auto":
        precision = resolve_precision(precision, device)[0]
    if precision in ("bf16", "fp16"):
        return lambda: torch.autocast(device_type=device.type, dtype=DTYPES[precision])
    return contextlib.nullcontext


class LossScaler:
    """fp16's gradient scaling around backward and the optimizer step; pass-through otherwise.

    Use: ``backward(loss)`` per micro-batch; ``unscale(optimizer)`` before clipping;
    ``step(optimizer, loss_finite)`` instead of ``optimizer.step()``: it returns False when
    the step was an overflow (update skipped, scale lowered).
    """

    def __init__(self, device: torch.device, precision: str):
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    @property
    def enabled(self) -> bool:
        return self.scaler is not None

    @property
    def scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def absorbs_nonfinite(self) -> bool:
        """A non-finite loss is an fp16 overflow to skip (not a failure) while the scale can still go down."""
        return self.scaler is not None and self.scaler.get_scale() > MIN_SCALE

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer, loss_finite: bool = True) -> bool:
        """Apply the update unless the gradients (or the loss) overflowed; True when it was applied."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        if loss_finite:
            self.scaler.step(optimizer)  # skips the update when unscale_ found inf/nan gradients
            self.scaler.update()
        else:  # the gradients of a non-finite loss are not looked at: skip and back off
            self.scaler.update(before * self.scaler.get_backoff_factor())
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)

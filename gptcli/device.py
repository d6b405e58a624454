"""Which torch device to run on (`auto` picks cuda, then mps, then cpu), and what the CPU is (/proc/cpuinfo)."""

import torch

from gptcli.errors import InputError


def cpu_info(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "cpu family", "flags", ...;
    ARM's "Features" is given as "flags"), or {} where the file cannot be read."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break  # the end of the first processor's block
                    continue
                key, _, value = line.partition(":")
                key = "flags" if key.strip() == "Features" else key.strip()
                fields.setdefault(key, value.strip())
    except OSError:
        pass
    return fields


def resolve_device(name: str = "auto") -> torch.device:
    """The torch.device for `name` (auto, cpu, cuda, cuda:N, mps).

    Raises:
        InputError: the name is unknown or that device is not available here.
    """
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"train.device {name!r}: CUDA is not available on this machine", param="train.device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"train.device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here", param="train.device")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"train.device {name!r}: MPS is not available on this machine", param="train.device")
    elif device.type != "cpu":
        raise InputError(f"train.device {name!r}: unsupported device type (use auto, cpu, cuda or mps)", param="train.device")
    return device


def check_device_name(name: str) -> None:
    """Raise InputError unless `name` spells a device gptcli can use (availability is not checked).

    torch accepts ``cpu:1`` and ``mps:1`` but has one CPU device and one MPS device,
    so any index other than 0 would be dropped without a word; an empty name is
    refused here, not taken as "not given".
    """
    if not name or name != name.strip():
        raise InputError(f"train.device {name!r}: empty or padded device name (use auto, cpu, cuda, cuda:N or mps)",
                         param="train.device")
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"train.device {name!r}: unknown device (use auto, cpu, cuda, cuda:N or mps)",
                         param="train.device") from None
    if device.type in ("cpu", "mps") and device.index not in (None, 0):
        raise InputError(f"train.device {name!r}: there is one {device.type} device; use {device.type}", param="train.device")

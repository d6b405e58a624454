"""Reading weights safely: the one hardened ``torch.load`` and the one key-mismatch report.

Every pickle gptcli reads (a checkpoint's training state, the book's ``.pth``, a
Hugging Face ``pytorch_model.bin``) goes through `torch_load`, which passes
``weights_only=True`` so a file that would construct objects or call functions is
refused, never executed. Every comparison of a file's tensor names with a model's
goes through `key_mismatch`, so all of them report the same way.
"""

from __future__ import annotations

import pickle
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gptcli.errors import GptcliError, RunError, first_line

SHOWN = 5  # names listed per kind of mismatch; a wrong model size mismatches nearly all of them

# What torch.load raised on refused or corrupted files (a fuzz of truncated and flipped
# zip and legacy pickles): the weights-only unpickler's refusal, torch's zip reader, and
# the pickle machinery meeting garbage. Anything else is a bug and should surface as one.
_BAD_FILE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, LookupError, struct.error,
             AssertionError, TypeError)


def torch_load(path: Path, what: str, error: type[GptcliError] = RunError) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Args:
        path: the file.
        what: what the file should hold, for the message (e.g. "training state").
        error: the error class to raise (InputError where the user named the file).

    Raises:
        `error`: the file is missing or unreadable, is refused as unsafe, or is corrupted;
            the message names the file.
    """
    try:
        with warnings.catch_warnings():  # torch's multi-line notes (pickle protocol, ...): the error says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or first_line(e)})") from None
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False: the one thing not to do here
        raise error(f"{path}: refused {what}: not a PyTorch file of plain tensors and containers (gptcli reads "
                    "nothing else: unpickling other objects could run code)") from None
    except _BAD_FILE as e:
        reason = ": ".join(filter(None, (type(e).__name__, first_line(e))))
        raise error(f"{path}: refused or unreadable {what} ({reason}); only plain tensors and containers are read") from None


def key_mismatch(expected: Iterable[str], found: Iterable[str]) -> list[str]:
    """What differs between the tensor names a model expects and those a file holds.

    Returns:
        [] when the names agree; otherwise "missing tensors: a, b ..." and/or
        "unexpected tensors: c ...", each listing at most SHOWN names and the count.
    """
    expected, found = set(expected), set(found)
    problems = []
    for kind, names in (("missing", sorted(expected - found)), ("unexpected", sorted(found - expected))):
        if names:
            more = f" ... ({len(names)} in all)" if len(names) > SHOWN else ""
            problems.append(f"{kind} tensors: {', '.join(names[:SHOWN])}{more}")
    return problems

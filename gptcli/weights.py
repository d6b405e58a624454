"""Weights in other formats: the book's .pth files, Hugging Face and OpenAI GPT-2.

Each importer returns a state_dict in gptcli's (= the book's) names; the model's
``load_state_dict`` then checks every tensor's presence and shape.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gptcli.errors import InputError, first_line


def load_book_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict the book's code saved (model.pth, or model_and_optimizer.pth).

    ``torch.load(weights_only=True)`` refuses pickles that would construct
    arbitrary objects or call functions; such a file is reported, never executed.

    Raises:
        InputError: the file is missing, refused, or holds no state_dict.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except Exception as e:
        raise InputError(
            f"{path}: refused to load ({type(e).__name__}: {first_line(e)}); "
            "only plain tensors are read from .pth files"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: not a state_dict (expected a mapping of names to tensors)")
    return obj


def from_book_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a state_dict of the book's GPTModel (or GPTModelFast) onto gptcli's names.

    The names are the book's own; what differs: the book stores each attention's
    causal mask as a buffer (we rebuild it), its "fast" model uses nn.LayerNorm
    (weight/bias instead of scale/shift), and torch.compile/DDP add prefixes.
    """
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^(_orig_mod\.|module\.)+", "", key)
        if key.endswith(".att.mask"):
            continue
        key = re.sub(r"\.att\.proj\.", ".att.out_proj.", key)
        key = re.sub(r"(norm\d?)\.weight$", r"\1.scale", key)
        key = re.sub(r"(norm\d?)\.bias$", r"\1.shift", key)
        if re.search(r"\.att\.qkv\.(weight|bias)$", key):  # GPTModelFast's fused projection
            prefix, kind = key.rsplit(".qkv.", 1)
            for name, part in zip(("W_query", "W_key", "W_value"), value.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{kind}"] = part
            continue
        out[key] = value
    return out

"""The one loss: token-level cross-entropy in float32, shared by train, eval and `loss`.

Sharing it is what makes the numbers of `gptcli train`, `gptcli eval` and
`gptcli loss` agree. It is the book's ``calc_loss_batch`` without the device move.
"""

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean (or summed, or per-token) cross-entropy of logits (B, T, V) against targets (B, T).

    Logits are upcast to float32 so bf16 autocast runs report the same loss scale;
    for float32 logits this is exactly ``F.cross_entropy(logits.flatten(0, 1), targets.flatten())``.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)

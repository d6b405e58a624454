"""Document-aware attention (``data.document_mask``): no token attends across a document boundary.

`gptcli prepare` ends every document with <|endoftext|> (and never emits that id
inside one: documents are tokenized with ``encode_ordinary``), so the token after
each <|endoftext|> is where the shards' ``*.docs.npy`` record a document start,
and a window carries its own boundaries. From them: a block-causal mask, query i
may attend key j when j <= i and both lie in the same document; and, with
``data.reset_positions``, position ids that restart at 0 at every document, so a
document in the middle of a window is computed as if it stood alone.

The mask goes to the model's ``attn_mask`` (PyTorch's scaled_dot_product_attention
with an explicit boolean mask; the book's explicit-softmax path is used only
without a mask, so the book-exact runs never see this code).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gptcli.config import DataConfig
from gptcli.tokenizer import END_OF_TEXT_ID


def document_starts(idx: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) bool: True where a document starts inside the window (after an <|endoftext|>)."""
    starts = torch.zeros_like(idx, dtype=torch.bool)
    starts[:, 1:] = idx[:, :-1] == eot_id
    return starts


def document_inputs(idx: torch.Tensor, eot_id: int, reset_positions: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(positions (B, T) or None, attn_mask (B, 1, T, T)) for windows `idx` (B, T)."""
    b, t = idx.shape
    starts = document_starts(idx, eot_id)
    doc = starts.cumsum(dim=1)  # (B, T) document number within the window
    causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T)
    positions = None
    if reset_positions:
        ar = torch.arange(t, device=idx.device).expand(b, t)
        first = torch.where(starts, ar, torch.zeros_like(ar)).cummax(dim=1).values  # (B, T) start of each token's document
        positions = ar - first
    return positions, mask[:, None]


class DocumentMasked(nn.Module):
    """Calls `module(idx, positions, attn_mask)` with the document mask of `idx`.

    Wraps the (possibly DDP/compiled) model for the training step and evaluation;
    ``model.unwrap`` finds the GPTModel through `module`.
    """

    def __init__(self, module: nn.Module, eot_id: int, reset_positions: bool):
        super().__init__()
        self.module = module
        self.eot_id = eot_id
        self.reset_positions = reset_positions
        self.train(module.training)  # the wrapped model's mode: restoring the wrapper's must not flip the model's

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """The module's output for `idx`; `kwargs` (e.g. return_hidden) pass through."""
        positions, attn_mask = document_inputs(idx, self.eot_id, self.reset_positions)
        return self.module(idx, positions, attn_mask, **kwargs)


def as_trained(module: nn.Module, data: DataConfig | None) -> nn.Module:
    """`module` called as training called it: within documents when `data.document_mask`, else unchanged.

    Every command that scores text with a trained model (the training loop's evaluation,
    `eval`, `loss`, task and harness scoring) goes through here, so a model trained with
    the document mask is never scored without it. `data` None: the plain model call.
    """
    if data is None or not data.document_mask:
        return module
    return DocumentMasked(module, END_OF_TEXT_ID, data.reset_positions)

"""Document-aware attention (``data.document_mask``): no token attends across a document boundary.

`gptcli prepare` ends every document with <|endoftext|>, and an <|endoftext|> written
inside a document's text is that token too (tokenizer.ALLOWED_SPECIAL, as the text
reader and the book encode it), so the token after each <|endoftext|> is where the
shards' ``*.docs.npy`` record a document start, and a window carries its own boundaries. From them: a block-causal mask, query i
may attend key j when j <= i and both lie in the same document; and, with
``data.reset_positions``, position ids that restart at 0 at every document, so a
document in the middle of a window is computed as if it stood alone.

The mask goes to the model's ``attn_mask`` in one of two forms, chosen here
(`flex_compiles`): a ``BlockMask`` for PyTorch's flex_attention where that compiles,
else an explicit boolean mask for scaled_dot_product_attention. The book's
explicit-softmax path is used only without a mask, so the book-exact runs never see
this code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.compiler import is_compiling
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from gptcli.config import DataConfig
from gptcli.model import unwrap
from gptcli.tokenizer import END_OF_TEXT_ID


def document_starts(idx: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, T) bool: True where a document starts inside the window (after an <|endoftext|>)."""
    starts = torch.zeros_like(idx, dtype=torch.bool)
    starts[:, 1:] = idx[:, :-1] == eot_id
    return starts


def flex_compiles(device: torch.device, attention_dropout: bool) -> bool:
    """Whether the document mask goes to flex_attention (a BlockMask) rather than to SDPA (a tensor).

    Only inside a compiled region: eager flex_attention is a slow reference implementation.
    Not for a CPU backward: torch 2.13 has none (inductor lowers only the forward on the CPU;
    flex_attention raises "does not support backward on CPU"), so CPU training keeps SDPA.
    """
    if attention_dropout:  # flex_attention has no dropout_p: SDPA applies the attention dropout
        return False
    return is_compiling() and (device.type != "cpu" or not torch.is_grad_enabled())


def document_inputs(idx: torch.Tensor, eot_id: int, reset_positions: bool,
                    attention_dropout: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | BlockMask]:
    """(positions (B, T) or None, attn_mask) for windows `idx` (B, T).

    Args:
        idx: token ids (B, T).
        eot_id: the id that ends every document.
        reset_positions: positions restart at 0 at each document (else None: 0..T-1).
        attention_dropout: the model applies dropout to attention weights in this call.

    Returns:
        attn_mask is a BlockMask where `flex_compiles`, else a boolean (B, 1, T, T) tensor;
        both say: query i attends key j when j <= i and both lie in the same document.
    """
    b, t = idx.shape
    starts = document_starts(idx, eot_id)
    doc = starts.cumsum(dim=1)  # (B, T) document number within the window
    if flex_compiles(idx.device, attention_dropout):

        def same_document_causal(b_, h_, q, k):
            return (k <= q) & (doc[b_, q] == doc[b_, k])

        mask = create_block_mask(same_document_causal, b, None, t, t, device=idx.device)
    else:
        causal = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
        mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
    positions = None
    if reset_positions:
        ar = torch.arange(t, device=idx.device).expand(b, t)
        first = torch.where(starts, ar, torch.zeros_like(ar)).cummax(dim=1).values  # (B, T) start of each token's document
        positions = ar - first
    return positions, mask


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
        self.drop_rate = unwrap(module).cfg.drop_rate
        self.train(module.training)  # the wrapped model's mode: restoring the wrapper's must not flip the model's

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """The module's output for `idx`; `kwargs` (e.g. return_hidden) pass through."""
        attention_dropout = unwrap(self.module).training and self.drop_rate > 0  # as MultiHeadAttention decides
        positions, attn_mask = document_inputs(idx, self.eot_id, self.reset_positions, attention_dropout)
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

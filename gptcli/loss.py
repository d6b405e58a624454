"""The one loss: token-level cross-entropy in float32, shared by train, eval and `loss`.

Sharing it is what makes the numbers of `gptcli train`, `gptcli eval` and
`gptcli loss` agree. It is the book's ``calc_loss_batch`` without the device move.
Training computes the same function with the output head in slices
(`chunked_cross_entropy`, ``train.loss_chunk``), equal up to float rounding.
"""

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean (or summed, or per-token) cross-entropy of logits (B, T, V) against targets (B, T).

    Logits are upcast to float32 so bf16 autocast runs report the same loss scale;
    for float32 logits this is exactly ``F.cross_entropy(logits.flatten(0, 1), targets.flatten())``.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


def training_loss(module, head_weight: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                  loss_chunk) -> torch.Tensor:
    """The training loss of `module` (a GPTModel, possibly wrapped) on one batch.

    Args:
        module: called as ``module(inputs)`` for logits, ``module(inputs, return_hidden=True)`` for hidden states.
        head_weight: the model's ``out_head.weight``.
        loss_chunk: 0 = the plain loss over full logits; auto or N = `chunked_cross_entropy`.
    """
    if not loss_chunk:
        return cross_entropy(module(inputs), targets)
    hidden = module(inputs, return_hidden=True)  # (B, T, C)
    return chunked_cross_entropy(hidden, head_weight, targets, vocab_size, chunk_rows(loss_chunk, targets.numel()))


# train.loss_chunk auto: at most this many slices (each adds one pass over the head's weight
# gradient), none smaller than AUTO_MIN_ROWS rows (smaller matmuls run below the peak).
AUTO_MAX_CHUNKS = 8
AUTO_MIN_ROWS = 512


def chunk_rows(loss_chunk, rows: int) -> int:
    """Rows per slice for ``train.loss_chunk`` (auto or a number) over `rows` (B*T) rows; 0 = plain loss."""
    if loss_chunk == "auto":
        return max(AUTO_MIN_ROWS, -(-rows // AUTO_MAX_CHUNKS))
    return int(loss_chunk)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          rows: int) -> torch.Tensor:
    """``cross_entropy(hidden @ weight[:vocab_size].T, targets)`` without the (B, T, V) logits.

    The output head and the loss are computed over `rows` rows of the flattened (B*T, C)
    hidden states at a time; each slice's logits (rows x V, float32) give its loss and
    its gradients at once and are freed before the next slice (the approach of Liger
    Kernel's fused linear cross-entropy). Exact up to float rounding: the head's matmul
    runs in the autocast dtype as ``nn.Linear`` would, the softmax in float32.

    Args:
        hidden: (B, T, C) final-norm outputs, the input of ``out_head``.
        weight: (V_padded, C) ``out_head.weight``; rows past `vocab_size` are padding.
        targets: (B, T) token ids; -100 is ignored as in ``F.cross_entropy``.
        vocab_size: logits kept (the model's ``cfg.vocab_size``).
        rows: slice size in rows.
    """
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, vocab_size, rows)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of a linear head; its gradients are computed in forward, slice by slice."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, rows):
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
        y = targets.reshape(-1)  # (N,)
        valid = y != -100
        count = valid.sum()
        w = weight.to(dtype)  # (Vp, C), once, as autocast would cast it per call
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = None  # float32 (Vp, C): the first slice's part, then the sum of the parts
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device_type, enabled=False), torch.no_grad():
            for start in range(0, h.shape[0], rows):
                # one slice's buffers live only inside _slice: never two slices' logits at once
                loss_sum, grad_w = _ChunkedLinearCrossEntropy._slice(
                    h[start:start + rows].to(dtype), y[start:start + rows], valid[start:start + rows], w, vocab_size,
                    count, grad_h[start:start + rows] if need_grad else None, grad_w)
                total += loss_sum
        if need_grad:
            ctx.save_for_backward(grad_h.view_as(hidden), grad_w.to(weight.dtype))
        return total / count

    @staticmethod
    def _slice(h_c, y_c, v_c, w, vocab_size, count, grad_h, grad_w) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The summed loss of one slice, and the head's gradient so far: with `grad_h` (its rows of
        the hidden states' gradient, written here) this slice's part is added to `grad_w` (None
        before the first slice: the part becomes it, so no zero-filled (Vp, C) buffer is swept)."""
        logits = (h_c @ w.T).float()  # (n, Vp), the only vocabulary-wide tensor, one slice at a time
        if logits.shape[1] != vocab_size:
            logits[:, vocab_size:] = -torch.inf  # padding rows take no probability
        picked = y_c.clamp(min=0)
        target_logit = logits.gather(1, picked[:, None])[:, 0]
        # log-sum-exp as torch.logsumexp computes it (max + log of the summed shifted exps), but in
        # place: its own temporaries would double this slice's memory
        top = logits.amax(dim=1)  # (n,)
        probs = logits.sub_(top[:, None]).exp_()  # unnormalised softmax, in the logits' memory
        del logits
        sums = probs.sum(dim=1)  # (n,)
        lse = top + sums.log()
        loss_sum = torch.where(v_c, lse - target_logit, 0.0).sum()
        if grad_h is None:
            return loss_sum, None
        # d(mean loss)/d logits = (softmax - onehot) / count, computed in place
        probs.div_(sums[:, None])
        probs.scatter_add_(1, picked[:, None], torch.full_like(lse[:, None], -1.0))
        probs.mul_(torch.where(v_c, 1.0, 0.0)[:, None] / count)
        if w.dtype == torch.float32:
            grad_h.copy_(probs @ w)
            return loss_sum, probs.T @ h_c if grad_w is None else grad_w.addmm_(probs.T, h_c)
        p = probs.to(w.dtype)
        del probs  # the float32 slice goes before the matmuls' outputs come
        grad_h.copy_(p @ w)
        part = p.T @ h_c  # (Vp, C) in the autocast dtype
        return loss_sum, part.float() if grad_w is None else grad_w.add_(part)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # Scaled in place: no second (Vp, C) buffer. A plain loss.backward() passes exactly 1, which
        # the CPU can see without a device sync; then the scaling pass is skipped.
        if grad_out.device.type != "cpu" or grad_out.item() != 1.0:
            grad_h.mul_(grad_out)
            grad_w.mul_(grad_out)
        return grad_h, grad_w, None, None, None

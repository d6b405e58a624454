"""The chunked training loss: the plain loss and its gradients, without the (B, T, V) logits."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model_config
from gptcli.documents import DocumentMasked
from gptcli.loss import chunk_rows, training_loss
from gptcli.model import GPTModel
from gptcli.tokenizer import END_OF_TEXT_ID


def _loss_and_grads(module, model, idx, targets, loss_chunk, scale=1.0):
    model.zero_grad(set_to_none=True)
    loss = training_loss(module, model.out_head.weight, idx, targets, model.cfg.vocab_size, loss_chunk)
    (loss * scale if scale != 1.0 else loss).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _model_and_batch(t=24, **overrides):
    cfg = tiny_model_config(drop_rate=0.0, impl="fused", pad_vocab_multiple=64, **overrides)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, t))
    targets = torch.randint(0, cfg.vocab_size, (3, t))
    return model, idx, targets


# 1 row; 7 and 50 divide neither T (24) nor B*T (72); 24 = one sequence; 1000 > B*T: a single slice
@pytest.mark.parametrize("rows", [1, 7, 24, 50, 1000])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(rows):
    model, idx, targets = _model_and_batch()
    plain, plain_grads = _loss_and_grads(model, model, idx, targets, 0)
    chunked, chunked_grads = _loss_and_grads(model, model, idx, targets, rows)
    # float32 sums in another order (per slice, then across slices): rounding of ~1e-7 relative
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("scale", [0.5, 1024.0])
def test_a_scaled_chunked_loss_scales_its_gradients_as_the_plain_one(scale):
    """backward() of a multiple of the loss (the fp16 scaler's, a user's weighting) scales every
    gradient by it: the backward pass scales in place, and skips that pass only for exactly 1."""
    model, idx, targets = _model_and_batch()
    _, plain_grads = _loss_and_grads(model, model, idx, targets, 0, scale)
    _, chunked_grads = _loss_and_grads(model, model, idx, targets, 7, scale)
    _, unscaled = _loss_and_grads(model, model, idx, targets, 7)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=0, atol=1e-5 * scale, msg=name)
        torch.testing.assert_close(chunked_grads[name], unscaled[name] * scale, rtol=1e-6, atol=0, msg=name)


def test_chunked_loss_composes_with_the_document_mask():
    model, idx, targets = _model_and_batch()
    idx[:, 5] = END_OF_TEXT_ID
    idx[1, 17] = END_OF_TEXT_ID
    masked = DocumentMasked(model, END_OF_TEXT_ID, reset_positions=True)
    plain, plain_grads = _loss_and_grads(masked, model, idx, targets, 0)
    chunked, chunked_grads = _loss_and_grads(masked, model, idx, targets, 10)
    unmasked, _ = _loss_and_grads(model, model, idx, targets, 10)
    assert not torch.equal(unmasked, chunked)  # the mask was applied
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5)  # float32 summation order, as above
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def test_chunked_loss_follows_bf16_autocast():
    """Under autocast the head's matmuls run in bf16 as nn.Linear's would: the loss agrees to bf16 rounding."""
    model, idx, targets = _model_and_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = _loss_and_grads(model, model, idx, targets, 0)
        chunked, _ = _loss_and_grads(model, model, idx, targets, 7)
    # bf16 keeps 8 bits of mantissa: logits of ~1 round by ~4e-3; a mean over 72 tokens stays well inside 2e-2
    torch.testing.assert_close(chunked, plain, rtol=0, atol=2e-2)


def test_auto_chunks_bound_the_slice_count_and_size():
    assert chunk_rows("auto", 8 * 256) == 512  # 124M at batch 8: four slices of 512 rows (103 MB each)
    assert chunk_rows("auto", 16 * 1024) == 2048  # at most eight slices
    assert chunk_rows("auto", 2 * 32) == 512  # a tiny batch: one slice
    assert chunk_rows(0, 100) == 0 and chunk_rows(96, 100) == 96

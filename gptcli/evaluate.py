"""Loss over loaders and files: cross-entropy, perplexity, bits per byte, per-token views.

``evaluate_loss`` is the book's ``calc_loss_loader``: the mean cross-entropy over
the first `num_batches` batches of a loader, computed with the one loss function
that training uses, so `gptcli train`, `gptcli eval` and `gptcli loss` agree.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from gptcli.checkpoint import list_step_checkpoints, load_checkpoint, resolve_checkpoint
from gptcli.config import Config
from gptcli.data import TokenWindows, WindowBatchSampler, load_splits, make_loader, read_corpus
from gptcli.device import resolve_device
from gptcli.errors import InputError, RunError
from gptcli.loss import cross_entropy
from gptcli.model import GPTModel, load_state_dict
from gptcli.tokenizer import decode, encode, get_tokenizer


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_batches: int | None = None,
    autocast: Callable = nullcontext,
    all_reduce: Callable[[list[float]], list[float]] | None = None,
    byte_lengths: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean token cross-entropy of `model` over (up to) `num_batches` batches of `loader`.

    Exactly the book's ``calc_loss_loader``: the loader is iterated afresh (a
    shuffling loader draws its seed from the global RNG, which keeps book-exact
    runs exact), each batch's mean loss comes from ``cross_entropy``, and the
    result is the plain average of the batch means. That is the mean over tokens
    whenever the batches are full (always for training windows; for validation
    unless its last batch is partial, where the book's weighting is kept so that
    printed losses match the book's).

    Args:
        model: returns logits (B, T, V); put in eval mode for the call, then restored.
        loader: yields (inputs, targets) of shape (B, T).
        device: where the batches go.
        num_batches: at most this many batches; None = the whole loader.
        autocast: a context manager factory for mixed precision.
        all_reduce: sums [loss_sum, tokens, batches, bytes] over processes (distributed evaluation).
        byte_lengths: UTF-8 length of each token id; adds "bytes" and "bpb" to the result.

    Returns:
        {"loss", "ppl", "tokens", "batches"}; loss is NaN when there are no batches.
    """
    limit = len(loader) if num_batches is None else min(num_batches, len(loader))
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, WindowBatchSampler) and sampler.mode == "stride":
        # Batches go round-robin to the ranks: together they evaluate the first `num_batches`.
        total = sampler.num_batches() if num_batches is None else min(num_batches, sampler.num_batches())
        limit = len(range(sampler.rank, total, sampler.world_size))
    was_training = model.training
    model.eval()
    loss_sum, tokens, num_bytes = 0.0, 0, 0
    try:
        if limit > 0:
            for i, (inputs, targets) in enumerate(loader):
                if i >= limit:
                    break
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with autocast():
                    logits = model(inputs)
                loss_sum += cross_entropy(logits, targets).item()
                tokens += targets.numel()
                if byte_lengths is not None:
                    num_bytes += int(byte_lengths[targets.cpu()].sum())
    finally:
        model.train(was_training)
    batches = limit
    if all_reduce is not None:
        loss_sum, tokens, batches, num_bytes = all_reduce([loss_sum, float(tokens), float(batches), float(num_bytes)])
        tokens, batches, num_bytes = int(tokens), int(batches), int(num_bytes)
    loss = loss_sum / batches if batches else float("nan")
    result = {"loss": loss, "ppl": perplexity(loss), "tokens": tokens, "batches": batches}
    if byte_lengths is not None:
        result["bytes"] = num_bytes
        result["bpb"] = bits_per_byte(loss, tokens, num_bytes) if num_bytes else float("nan")
    return result


def perplexity(loss: float) -> float:
    """exp(loss), saturating at inf instead of overflowing."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def bits_per_byte(loss: float, num_tokens: int, num_bytes: int) -> float:
    """Total information in bits divided by UTF-8 bytes: comparable across tokenizers.

    The summed cross-entropy is ``loss * num_tokens`` nats; dividing by ln 2 gives bits.
    """
    return loss * num_tokens / (math.log(2) * num_bytes)


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> torch.Tensor:
    """UTF-8 byte length of every GPT-2 token id (for bits per byte)."""
    enc = get_tokenizer()
    return torch.tensor([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=torch.long)


def evaluate_datasets(
    model: GPTModel, cfg: Config, data: list[str] = (), num_batches: int | None = None, batch_size: int | None = None
) -> list[dict[str, Any]]:
    """Loss, perplexity and bits per byte on the config's validation split and on each file in `data`.

    Files are read whole and cut into the book's windows (stride = context length).

    Raises:
        InputError: a file cannot be read or is shorter than one window.
    """
    device = model.tok_emb.weight.device
    bs = batch_size or cfg.train.batch_size
    ctx = cfg.model.context_length
    lengths = token_byte_lengths()
    rows = []
    if not data:
        splits = load_splits(cfg.data, ctx)
        loader = make_loader(splits.val, bs, shuffle=False, drop_last=False)
        rows.append({"dataset": f"val ({splits.source})",
                     **evaluate_loss(model, loader, device, num_batches, byte_lengths=lengths)})
    for path in data:
        tokens = torch.tensor(encode(read_corpus(Path(path))), dtype=torch.long)
        if len(tokens) < ctx + 1:
            raise InputError(f"{path}: {len(tokens)} tokens, one window needs {ctx + 1} (context_length + 1)")
        loader = make_loader(TokenWindows(tokens, ctx, ctx), bs, shuffle=False, drop_last=False)
        rows.append({"dataset": str(path), **evaluate_loss(model, loader, device, num_batches, byte_lengths=lengths)})
    return rows


def evaluate_run(run: Path, data: list[str] = (), num_batches: int | None = None, device: str | None = None) -> list[dict[str, Any]]:
    """Evaluate every complete step checkpoint of a run directory, oldest first.

    Raises:
        RunError: the run holds no complete checkpoint.
    """
    paths = list_step_checkpoints(Path(run))
    if not paths:
        ckpt_dir, _ = resolve_checkpoint(Path(run))
        paths = [ckpt_dir]
    rows = []
    for path in paths:
        try:
            ckpt = load_checkpoint(path)
        except RunError:
            continue  # incomplete or damaged: skipped, as resume would skip it
        cfg = ckpt.config
        model = GPTModel(cfg.model)
        load_state_dict(model, ckpt.weights)
        model.to(resolve_device(device or cfg.train.device)).eval()
        for row in evaluate_datasets(model, cfg, data, num_batches):
            rows.append({"checkpoint": path.name, "step": ckpt.manifest.get("step"), **row})
    if not rows:
        raise RunError(f"{run}: no complete checkpoint to evaluate")
    return rows


@torch.no_grad()
def token_report(model: GPTModel, text: str, top: int = 5) -> dict[str, Any]:
    """For each token of `text`, the probability the model gave it, its rank and the top alternatives.

    Text longer than the context is scored in consecutive windows of context_length tokens.

    Raises:
        InputError: the text has fewer than two tokens (nothing to predict).
    """
    ids = encode(text)
    if len(ids) < 2:
        raise InputError("--text: needs at least two tokens (the first one is only context)")
    ctx = model.cfg.context_length
    device = model.tok_emb.weight.device
    model.eval()
    tokens = [{"pos": 0, "id": ids[0], "token": decode([ids[0]]), "prob": None, "rank": None, "top": []}]
    nats = 0.0
    for start in range(0, len(ids) - 1, ctx):
        chunk = ids[start : start + ctx + 1]
        x = torch.tensor([chunk[:-1]], device=device)
        logprobs = torch.log_softmax(model(x)[0].float(), dim=-1)  # (T, V)
        for i, target in enumerate(chunk[1:]):
            lp = logprobs[i]
            p_target = float(lp[target].exp())
            rank = int((lp > lp[target]).sum()) + 1
            top_lp, top_ids = lp.topk(top)
            nats -= float(lp[target])
            tokens.append({
                "pos": start + i + 1, "id": target, "token": decode([target]), "prob": p_target, "rank": rank,
                "top": [{"id": int(j), "token": decode([int(j)]), "prob": float(v.exp())} for v, j in zip(top_lp, top_ids)],
            })
    predicted = len(ids) - 1
    num_bytes = sum(int(token_byte_lengths()[t]) for t in ids[1:])
    loss = nats / predicted
    return {"text": text, "tokens": tokens, "loss": loss, "ppl": perplexity(loss),
            "bpb": bits_per_byte(loss, predicted, num_bytes), "bytes": num_bytes, "tokens_predicted": predicted}

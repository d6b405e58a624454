"""Sampling from a GPT model: the book's loop, made fast with a KV cache.

The book's ``generate`` feeds the last `context_length` tokens through the model
for every new token. ``generate`` here gives the same tokens: it prefills the
prompt once and then feeds one token per step through a KV cache. Once a
sequence outgrows the context, every position embedding shifts with the sliding
window, so from then on each step recomputes the window, exactly as the book does.

Prompts of different lengths share a batch by left padding: pad positions are
masked out of attention and each row's real tokens keep positions 0, 1, ...
"""

from __future__ import annotations

from typing import Callable

import torch

from gptcli.model import GPTModel


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token (B, 1) from last-position logits (B, V).

    The book's order: keep the top-k logits, scale by the temperature, then (our
    addition) keep the nucleus of probability `top_p`, and draw with
    ``torch.multinomial``; temperature 0 is greedy (argmax).
    """
    if top_k is not None:
        top_logits, _ = torch.topk(logits, top_k)
        min_val = top_logits[:, -1:]  # (B, 1): the k-th largest of each row
        logits = torch.where(logits < min_val, torch.tensor(float("-inf"), device=logits.device), logits)
    if temperature <= 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits / temperature
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set of tokens whose probability reaches `top_p`.

    Tokens are taken in order of probability; a token stays if the probability of
    the tokens before it is still below `top_p` (so the most likely token always stays).
    """
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _window(idx: torch.Tensor, lengths: torch.Tensor, context: int):
    """The last `context` columns of a left-padded batch, with positions and an attention mask.

    Returns (idx, positions, mask); positions and mask are None when no row has
    padding inside the window, which is the book's plain call ``model(idx[:, -context:])``.
    """
    idx = idx[:, -context:]
    width = idx.shape[1]
    real = torch.clamp(lengths, max=width)  # real tokens of each row inside the window
    if bool((real == width).all()):
        return idx, None, None
    pad = (width - real).unsqueeze(1)  # (B, 1)
    cols = torch.arange(width, device=idx.device).unsqueeze(0)  # (1, W)
    positions = torch.clamp(cols - pad, min=0)  # (B, W)
    is_real = cols >= pad  # (B, W)
    causal = torch.ones(width, width, dtype=torch.bool, device=idx.device).tril()
    # A pad query attends to itself only, so its row stays finite; real queries never see pads.
    mask = (causal & is_real.unsqueeze(1)) | torch.eye(width, dtype=torch.bool, device=idx.device)
    return idx, positions, mask.unsqueeze(1)  # mask (B, 1, W, W)


@torch.no_grad()
def generate(
    model: GPTModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        model: a GPTModel (put in eval mode by the caller).
        prompts: token ids, one non-empty list per sequence; lengths may differ.
        max_new_tokens: tokens to add to each sequence.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_k: sample among the k most likely tokens only.
        top_p: sample from the smallest set of tokens with probability >= top_p.
        eos_id: a sequence stops once it produces this id (which is not returned).
        use_cache: prefill + one token per step; False runs the book's full recompute.
        generator: RNG for sampling; None uses the global torch RNG, as the book does.
        on_tokens: called after each step with the new ids (B,) and a (B,) mask of
            the sequences still running, for streaming.

    Returns:
        The new tokens of each sequence (the prompt not included).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.tok_emb.weight.device
    context = model.cfg.context_length
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    idx = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        idx[row, width - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)

    running = torch.ones(len(prompts), dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    cache = model.new_kv_cache(len(prompts)) if use_cache and width < context else None
    for step in range(max_new_tokens):
        if cache is not None and idx.shape[1] <= context:
            logits = _cached_step(model, cache, idx, lengths, first=step == 0)
        else:
            cache = None  # the window slides from here on: positions shift, recompute
            window, positions, mask = _window(idx, lengths, context)
            logits = model(window, positions=positions, attn_mask=mask)[:, -1, :]
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            running &= next_ids.squeeze(1) != eos_id
        new_tokens.append(torch.where(running.unsqueeze(1), next_ids, torch.full_like(next_ids, -1)))
        if on_tokens is not None:
            on_tokens(next_ids.squeeze(1), running)
        if not bool(running.any()):
            break
        idx = torch.cat([idx, next_ids], dim=1)
        lengths = lengths + 1
    if not new_tokens:
        return [[] for _ in prompts]
    out = torch.cat(new_tokens, dim=1).tolist()
    return [[t for t in row if t >= 0] for row in out]


def _cached_step(model: GPTModel, cache, idx: torch.Tensor, lengths: torch.Tensor, first: bool) -> torch.Tensor:
    """Last-position logits (B, V), feeding the whole prompt on the first step and one token after."""
    width = idx.shape[1]
    padded = bool((lengths != width).any())
    if first:
        _, positions, mask = _window(idx, lengths, width)
        return model(idx, positions=positions, attn_mask=mask, kv_cache=cache)[:, -1, :]
    positions = (lengths - 1).unsqueeze(1) if padded else None  # (B, 1): each row's own position
    mask = None
    if padded:
        pad = (width - lengths).unsqueeze(1)  # (B, 1)
        mask = (torch.arange(width, device=idx.device).unsqueeze(0) >= pad)[:, None, None, :]  # (B, 1, 1, S)
    return model(idx[:, -1:], positions=positions, attn_mask=mask, kv_cache=cache)[:, -1, :]

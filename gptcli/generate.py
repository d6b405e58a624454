"""Sampling from a GPT model: the book's loop, made fast with a KV cache.

The book's ``generate`` (chapter 5) feeds the last `context_length` tokens
through the model for every new token and computes the logits of every position.
``generate`` here gives the same tokens: it prefills the prompt once, then feeds
one token per step through a KV cache and computes the output head for the last
position only. Once a sequence outgrows the context, every position embedding
shifts with the sliding window (GPT-2's positions are absolute), so cached keys
and values no longer apply: from then on each step recomputes the window, as the
book does, still with the head on the last position only.

Prompts of different lengths share a batch by left padding: pad positions are
masked out of attention and each row's real tokens keep positions 0, 1, ..., so
every row gets the tokens it would get alone.

Sampling keeps the book's order and random draws: top-k filter, temperature,
``torch.multinomial`` on the global torch RNG (or on `generator`), so a seeded
batch-1 run gives the book's tokens. Top-p (nucleus) filtering is our addition,
applied after the temperature.

Example::

    from gptcli.generate import generate
    from gptcli.tokenizer import decode, encode

    torch.manual_seed(123)
    new = generate(model.eval(), [encode("Every effort moves you")], 25, temperature=1.4, top_k=25)
    print(decode(new[0]))
"""

from __future__ import annotations

import codecs
import copy as copy_module
import math
from typing import Callable

import torch

from gptcli.errors import InputError
from gptcli.model import GPTModel, KVCache, StaticKVCache
from gptcli.tokenizer import VOCAB_SIZE, get_tokenizer

# With `eos_id` set and no `on_tokens` callback, look every this many steps whether all
# sequences have ended: reading a device value stalls a GPU's queue of launched kernels.
EOS_CHECK_EVERY = 8
# Columns for new tokens allocated up front; beyond them the buffer doubles as tokens come. `max_new_tokens` is a
# bound that <|endoftext|> may cut short: a buffer of its size up front failed to allocate for a large one.
FIRST_ROOM = 4096


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, vocab_size: int | None = None
) -> None:
    """Raise InputError, naming the parameter, for a sampling argument out of range.

    `top_k` is checked against `vocab_size` when that is given, else only for >= 1.
    With `vocab_size` given, `top_k` and `top_p` are refused at temperature 0: greedy decoding ignores them.
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens: must be >= 0, got {max_new_tokens}", param="max_new_tokens")
    if not 0.0 <= temperature < math.inf:  # also refuses NaN
        raise InputError(f"temperature: must be a finite number >= 0 (0 = greedy), got {temperature}",
                         param="temperature")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k: must be >= 1, got {top_k}", param="top_k")
    if top_k is not None and vocab_size is not None and top_k > vocab_size:
        raise InputError(f"top_k: must be at most the vocabulary size {vocab_size}, got {top_k}", param="top_k")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p: must be in (0, 1], got {top_p}", param="top_p")
    # Greedy decoding takes the most likely token, which every top-k and top-p filter keeps:
    # the flag would be ignored, so it is refused instead (once the range checks above are
    # complete, i.e. with `vocab_size`, so an out-of-range top_k is reported as such).
    for name, value in (("top_k", top_k), ("top_p", top_p)):
        if value is not None and temperature == 0.0 and vocab_size is not None:
            raise InputError(f"{name}: has no effect with temperature=0 (greedy decoding); "
                             f"give a temperature > 0 to sample, or drop {name}={value}", param=name)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token ids (B, 1) from last-position logits (B, V).

    The book's order: keep the `top_k` largest logits, then either take the argmax
    (temperature 0) or divide by the temperature, keep the nucleus of probability
    `top_p` (our addition) and draw one token with ``torch.multinomial``.

    Args:
        logits: (B, V) scores of the next token.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_k: keep the k largest logits of each row (ties with the k-th are kept too).
        top_p: keep the smallest set of most likely tokens whose probability reaches p.
        generator: RNG on the logits' device for the draw; None uses the global torch RNG, as the book does.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]  # (B, 1); the book's [:, -1] only broadcasts at B = 1
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    scaled = logits / temperature
    # A temperature below ~1e-38 overflows logits / temperature to inf (softmax: inf - inf = nan). Shift the best
    # logit to 0 first: the best tokens keep 0, the rest -inf or a huge negative, i.e. (near-)greedy, never nan.
    # Rows that did not overflow keep the book's plain division (the same draws).
    gap = logits - logits.amax(dim=-1, keepdim=True)
    shifted = torch.where(gap == 0, gap, gap / temperature)
    logits = torch.where(torch.isfinite(scaled.amax(dim=-1, keepdim=True)), scaled, shifted)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set of tokens whose probability reaches `top_p`.

    Tokens are taken from the most likely down; a token stays while the probability
    of the tokens before it is still below `top_p`, so the most likely token always
    stays and the kept set is the smallest one with mass >= `top_p` (Holtzman et
    al. 2020, "The Curious Case of Neural Text Degeneration", section 3.1).

    Args:
        logits: (B, V) scores; -inf entries have probability 0.
        top_p: the nucleus mass, in (0, 1].
    """
    # Float64 prefix sums, so a set whose mass is exactly `top_p` is not lost to rounding.
    probs = torch.softmax(logits.double(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1)
    mass_before = torch.cat([torch.zeros_like(mass_before[:, :1]), mass_before[:, :-1]], dim=-1)
    drop_sorted = mass_before >= top_p
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def optimize_for_decoding(model: GPTModel, batch_size: int, *, copy: bool = False) -> GPTModel:
    """Lay out the model's matrices for fast decoding of `batch_size` sequences on the CPU.

    Takes ownership of `model` (the default): its Linear weights get new storage in place
    and `model` itself is returned. With ``copy=True`` the caller's model is left as it was
    and a decoding copy is returned (it shares the embeddings and norms, which stay as they
    are, and costs one more copy of the Linear weights).

    Decoding multiplies `batch_size` rows by every weight matrix, so its speed is
    the memory bandwidth of those small products. On the CPU (torch 2.13, x86),
    ``x @ W`` with W stored (in, out) streams 15-35 % faster than nn.Linear's
    ``x @ W.T`` with W stored (out, in) for 1 or 2 rows, and 15 % slower for 8
    (benchmarks/generate_speed.py shows the effect). So for <= 2 sequences each
    Linear weight keeps its shape (out, in), name and values but is stored
    column-major, making ``W.T`` the contiguous (in, out) operand; otherwise (and
    on other devices) the usual row-major storage is restored. Outputs are
    unchanged, and checkpoints store contiguous copies either way.

    In place, for inference only: call it on a model no optimizer or DDP/FSDP wrapper holds
    (they keep views of the old storage), or pass ``copy=True``.
    """
    column_major = model.tok_emb.weight.device.type == "cpu" and batch_size <= 2
    if copy:
        model = _copy_sharing_tensors(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.data
                if column_major and w.is_contiguous():
                    w = w.T.contiguous().T
                elif not column_major and not w.is_contiguous():
                    w = w.contiguous()
                if copy:  # a new Parameter: the caller's module keeps its own
                    module.weight = torch.nn.Parameter(w, requires_grad=module.weight.requires_grad)
                else:
                    module.weight.data = w
    return model


def _copy_sharing_tensors(model: GPTModel) -> GPTModel:
    """A new module tree with the same parameter and buffer tensors (no tensor is copied)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy_module.deepcopy(model, memo)


DECODE_PRECISIONS = ("fp32", "bf16", "int8")


class Int8Linear(torch.nn.Module):
    """A Linear layer for decoding with int8 weights: weight-only quantisation, one scale per output row.

    Decoding a few sequences reads every weight once per token, so its speed is the bytes
    of the weights: int8 reads a quarter of float32's. Each row w of W (out, in) is stored
    as round(w / s) in [-127, 127] with s = max|w| / 127 (symmetric, per output channel, as
    gpt-fast's int8 weight-only mode), so each weight is off by at most s / 2. Activations
    stay in `dtype` (bf16: the fused int8 x bf16 kernel ``_weight_int8pack_mm`` exists for it).
    """

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127  # (out,)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(self.scale.dtype).contiguous()  # (B*T, in)
        try:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
        except (RuntimeError, NotImplementedError):  # no fused kernel for this device/dtype: dequantise
            y = x2 @ (self.weight.to(x2.dtype) * self.scale[:, None]).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def lower_precision_for_decoding(model: GPTModel, precision: str) -> GPTModel:
    """A copy of `model` that decodes in `precision`; "fp32" returns `model` itself (the exact mode).

    The caller's model is never changed. The copy is for inference only.

    Exactness cost (what tests/test_generate.py checks against float32 on the same
    prompts): "bf16" rounds weights, activations and the KV cache to 8 significant bits,
    "int8" also rounds each weight to 1/254 of its row's largest magnitude. Logits move by
    a small fraction of their spread, so the greedy token changes only where float32's two
    best logits are that close; once one token differs, the rest of the sequence may too.
    Sampling draws from the float32 softmax of the low-precision logits.

    Args:
        model: a GPTModel (its weights stay as they are).
        precision: "fp32" | "bf16" | "int8" (int8 weight-only, bf16 activations).

    Raises:
        InputError: naming --decode-precision for an unknown precision.
    """
    if precision not in DECODE_PRECISIONS:
        raise InputError(f"--decode-precision: must be one of {', '.join(DECODE_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return model
    low = copy_module.deepcopy(model).to(torch.bfloat16).eval()
    if precision == "int8":
        with torch.no_grad():
            for module in list(low.modules()):
                for name, child in module.named_children():
                    if isinstance(child, torch.nn.Linear):
                        setattr(module, name, Int8Linear(child, torch.bfloat16))
    return low


@torch.inference_mode()
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
    static_cache: bool = False,
    compile_decode: bool = False,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Each row gets the tokens the book's ``generate`` gives it alone: a prompt
    longer than the context is cut to its last `context_length` tokens, and a
    sequence that outgrows the context keeps its last `context_length` tokens.

    Args:
        model: a GPTModel in eval mode (dropout would make greedy decoding random).
        prompts: token ids, one non-empty list per sequence; lengths may differ.
        max_new_tokens: tokens to add to each sequence (>= 0).
        temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: sample among the k most likely tokens only (1 = greedy).
        top_p: sample from the smallest set of most likely tokens with probability >= top_p.
        eos_id: a sequence ends when it produces this id (which is not returned). Whether
            all have ended is looked at every EOS_CHECK_EVERY steps (every step with
            `on_tokens`), so the RNG may have made a few more draws than the book's loop.
        use_cache: prefill + one token per step; False runs the book's full recompute,
            op for op (logits of every position), for book-exact output.
        generator: RNG on the model's device for sampling; None uses the global torch RNG
            (seeded by ``torch.manual_seed``), as the book does.
        on_tokens: called after each step with the new ids (B,) and a (B,) bool mask
            of the sequences still running (False from the step that produced
            `eos_id` on); for streaming. It reads device values every step.
        static_cache: decode over a StaticKVCache (fixed shapes, every step attends over
            all slots, masked): the same tokens, other float rounding in attention.
        compile_decode: ``torch.compile`` the one-token step over a static cache (implies
            `static_cache`); for GPUs, where it removes the launch cost of ~100 small kernels
            per token. The first call compiles (tens of seconds); the prefill and a sliding
            window past the context stay eager.

    Returns:
        The new tokens of each sequence, in prompt order, without the prompt and without `eos_id`.

    Raises:
        InputError: an empty prompt, a token id outside the vocabulary, or a
            sampling argument out of range (see ``check_sampling``).
    """
    cfg = model.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("prompt: empty; every prompt needs at least one token")
    decodable = min(cfg.vocab_size, VOCAB_SIZE)
    check_sampling(max_new_tokens, temperature, top_k, top_p, decodable)
    low, high = min(min(p) for p in prompts), max(max(p) for p in prompts)
    if low < 0 or high >= cfg.vocab_size:
        raise InputError(f"prompt: token id {low if low < 0 else high} is outside the vocabulary (0..{cfg.vocab_size - 1})")
    if compile_decode and not use_cache:
        raise InputError("--compile-decode: compiles the KV-cache step; it cannot apply with --no-cache")
    if max_new_tokens == 0:
        return [[] for _ in prompts]

    device = model.tok_emb.weight.device
    context = cfg.context_length
    prompts = [p[-context:] for p in prompts]  # the book's idx[:, -context_size:]
    batch, width = len(prompts), max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    # All tokens, left-padded, with room for new ones (grown below): columns [0, width) hold the prompts.
    seq = torch.zeros(batch, width + min(max_new_tokens, FIRST_ROOM), dtype=torch.long)
    for row, p in enumerate(prompts):
        seq[row, pads[row] : width] = torch.tensor(p, dtype=torch.long)
    seq = seq.to(device)
    pad = torch.tensor(pads, device=device).unsqueeze(1)  # (B, 1)
    max_pad = max(pads)
    # The cache serves while the sequence fits the context: it holds at most the fed tokens.
    static = static_cache or compile_decode
    # A static cache spans the whole context, so its shapes (and a compiled step) serve every call at this batch size.
    max_len = context if static else min(context, width + max_new_tokens - 1)
    cache = model.new_kv_cache(batch, max_len, static=static) if use_cache else None
    running = torch.ones(batch, dtype=torch.bool, device=device)

    steps = 0
    for step in range(max_new_tokens):
        cur = width + step  # columns of `seq` filled so far
        if static and cur <= context:
            logits = _static_logits(model, cache, seq, cur, pad, compile_decode)
        elif cache is not None and cur <= context:
            logits = _cached_logits(model, cache, seq, cur, pad, max_pad, prefill=step == 0)
        else:
            logits = _window_logits(model, seq, cur, pad, max_pad, context, last_only=use_cache)
        # .float(): a low-precision model's logits are sampled in float32 (a no-op for the exact mode);
        # ids past the tokenizer's (a vocabulary padded beyond GPT-2's 50257) have no text: never drawn.
        next_ids = sample_next(logits[:, :decodable].float(), temperature, top_k, top_p, generator)[:, 0]  # (B,)
        if cur == seq.shape[1]:  # full: double the room (amortized, a copy per token at most)
            seq = torch.cat([seq, seq.new_zeros(batch, min(seq.shape[1], width + max_new_tokens - cur))], dim=1)
        seq[:, cur] = next_ids
        steps = step + 1
        if eos_id is not None:
            running &= next_ids != eos_id
        if on_tokens is not None:
            on_tokens(next_ids, running)
        if eos_id is not None and (on_tokens is not None or steps % EOS_CHECK_EVERY == 0) and not bool(running.any()):
            break
    new = seq[:, width : width + steps].tolist()  # the one device -> host copy
    return [row[: row.index(eos_id)] if eos_id in row else row for row in new]


def _cached_logits(
    model: GPTModel, cache: KVCache, seq: torch.Tensor, cur: int, pad: torch.Tensor, max_pad: int, prefill: bool
) -> torch.Tensor:
    """Last-position logits (B, V): the whole prompt on the first step, then the newest token only."""
    if prefill:
        positions, mask = _padding_positions_and_mask(cur, pad) if max_pad else (None, None)
        return model(seq[:, :cur], positions=positions, attn_mask=mask, kv_cache=cache, last_only=True)[:, -1]
    x = seq[:, cur - 1 : cur]  # (B, 1)
    if not max_pad:
        return model(x, kv_cache=cache, last_only=True)[:, -1]  # positions continue from cache.pos
    positions = (cur - 1) - pad  # (B, 1): each row's own position
    keys_real = torch.arange(cur, device=seq.device) >= pad  # (B, S): the pad keys stay hidden
    return model(x, positions=positions, attn_mask=keys_real[:, None, None, :], kv_cache=cache, last_only=True)[:, -1]


def _static_logits(
    model: GPTModel, cache: StaticKVCache, seq: torch.Tensor, cur: int, pad: torch.Tensor, compiled: bool
) -> torch.Tensor:
    """Last-position logits (B, V) over a StaticKVCache: the prompt (eager) first, then one token a step."""
    slots = torch.arange(cache.max_len, device=seq.device)  # (S,)
    if cache.input_pos is None:  # prefill: positions and mask of the prompt, widened to every slot
        positions, mask = _padding_positions_and_mask(cur, pad)  # (B, W), (B, 1, W, W)
        mask = torch.nn.functional.pad(mask, (0, cache.max_len - cur))  # (B, 1, W, S): later slots hidden
        cache.input_pos = slots[:cur]
        return model(seq[:, :cur], positions=positions, attn_mask=mask, kv_cache=cache, last_only=True)[:, -1]
    cache.input_pos = slots[cur - 1 : cur]  # (1,): the newest token's slot
    positions = (cur - 1) - pad  # (B, 1): each row's own position
    mask = ((slots >= pad) & (slots < cur))[:, None, None, :]  # (B, 1, 1, S): real tokens written so far
    step = _compiled_decode_step(seq.device.type) if compiled else _decode_step
    x = seq[:, cur - 1 : cur].contiguous()  # (B, 1): strides of its own, not of `seq` (whose width varies by call)
    return step(model, cache, x, positions, mask)


def _decode_step(model: GPTModel, cache: StaticKVCache, x: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """One token per row through the model over a static cache: shapes are the same at every step."""
    return model(x, positions=positions, attn_mask=mask, kv_cache=cache, last_only=True)[:, -1]


_COMPILED: dict[str, Callable] = {}


def _compiled_decode_step(device_type: str) -> Callable:
    """`_decode_step` compiled once per process and device type (a new model or shape recompiles through its guards)."""
    if device_type not in _COMPILED:
        # CUDA: "reduce-overhead" replays the step as one CUDA graph (gpt-fast's decode setting); its
        # output buffer is reused by the next replay, and the logits are consumed before that.
        # fullgraph: a graph break would silently leave the step partly eager.
        mode = "reduce-overhead" if device_type == "cuda" else "default"
        _COMPILED[device_type] = torch.compile(_decode_step, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED[device_type]


def _window_logits(
    model: GPTModel, seq: torch.Tensor, cur: int, pad: torch.Tensor, max_pad: int, context: int, last_only: bool
) -> torch.Tensor:
    """Last-position logits (B, V) of the last `context` tokens, recomputed from scratch (the book's step)."""
    start = max(0, cur - context)
    x = seq[:, start:cur]
    if max_pad <= start:  # no row has padding inside the window: the book's plain call
        return model(x, last_only=last_only)[:, -1]
    positions, mask = _padding_positions_and_mask(cur - start, (pad - start).clamp(min=0))
    return model(x, positions=positions, attn_mask=mask, last_only=last_only)[:, -1]


def _padding_positions_and_mask(width: int, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, W) and attention mask (B, 1, W, W) for rows with `pad` (B, 1) leading pad tokens.

    Real tokens get positions 0, 1, ... and see only real tokens before them. A pad
    query sees itself only, which keeps its row finite: a NaN there would reach the
    real rows through the 0 * NaN of the attention-weighted sum.
    """
    cols = torch.arange(width, device=pad.device).unsqueeze(0)  # (1, W)
    positions = (cols - pad).clamp(min=0)  # (B, W)
    is_real = cols >= pad  # (B, W)
    causal = torch.ones(width, width, dtype=torch.bool, device=pad.device).tril()
    mask = (causal & is_real.unsqueeze(1)) | torch.eye(width, dtype=torch.bool, device=pad.device)
    return positions, mask.unsqueeze(1)


class TextStream:
    """Turns token ids, one at a time, into text as soon as their bytes form whole characters.

    A GPT-2 token is a byte string, and one character (an emoji, a CJK character)
    can be split over several tokens; decoding each token alone would print U+FFFD
    for each piece. Incomplete bytes wait here for the next token instead.
    """

    def __init__(self):
        self._tokenizer = get_tokenizer()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character is still incomplete)."""
        return self._decoder.decode(self._tokenizer.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        """What is left at the end: U+FFFD for a character that never completed."""
        return self._decoder.decode(b"", final=True)


def complete(
    model: GPTModel,
    prompts: list[str],
    max_new_tokens: int,
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos: bool = True,
    use_cache: bool = True,
    seed: int = 123,
    on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    warn: Callable[[str], None] | None = None,
    decode_precision: str = "fp32",
    compile_decode: bool = False,
) -> list[dict]:
    """Continue each text prompt `num_samples` times in one batch, seeded as the book seeds: right before sampling.

    Args:
        model: a GPTModel in eval mode; it is laid out for decoding (see ``optimize_for_decoding``),
            so it should be one that no optimizer or wrapper holds.
        prompts: the texts to continue.
        max_new_tokens, temperature, top_k, top_p, use_cache, on_tokens: as ``generate``.
        num_samples: samples per prompt, in prompt order.
        eos: a sample ends at <|endoftext|>.
        seed: ``torch.manual_seed`` before sampling.
        decode_precision, compile_decode: ``lower_precision_for_decoding`` (fp32: the exact model) and
            ``generate``'s compiled decode step.
        warn: told, in one line each, about a prompt longer than the context (its start is dropped)
            and about several samples of greedy decoding (all the same).

    Returns:
        One dict per sample: {"prompt", "sample", "text" (prompt + completion), "completion",
        "ids", "new_tokens", "finish": "eos" or "length"}.
    """
    from gptcli.tokenizer import END_OF_TEXT_ID, decode, encode

    warn = warn or (lambda message: None)
    if num_samples > 1 and temperature == 0.0:
        warn(f"num_samples={num_samples} with greedy decoding (temperature=0) gives {num_samples} identical "
             "samples; give a temperature > 0 to sample")
    context = model.cfg.context_length
    encoded = [encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) > context:
            which = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
            warn(f"{which} has {len(ids)} tokens, the context {context}: its first {len(ids) - context} tokens are "
                 f"dropped and it continues from its last {context}")
    batch = [ids for ids in encoded for _ in range(num_samples)]
    model = optimize_for_decoding(lower_precision_for_decoding(model, decode_precision), len(batch))
    torch.manual_seed(seed)  # the book seeds right before it samples
    outs = generate(model, batch, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=END_OF_TEXT_ID if eos else None, use_cache=use_cache, on_tokens=on_tokens,
                    compile_decode=compile_decode)
    samples = []
    for i, out in enumerate(outs):
        prompt, completion = prompts[i // num_samples], decode(out)
        samples.append({"prompt": prompt, "sample": i % num_samples, "text": prompt + completion,
                        "completion": completion, "ids": out, "new_tokens": len(out),
                        "finish": "eos" if len(out) < max_new_tokens else "length"})
    return samples

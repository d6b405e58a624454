"""The book's GPT model (chapter 4), with the module names its readers know.

Parameters are created in the book's order with PyTorch's default initialisation,
so ``torch.manual_seed(123); GPTModel(cfg)`` gives the book's ``GPTModel`` weight
for weight. With ``impl: book`` the forward pass performs the book's operations
in the book's order (bit-identical training runs); ``impl: fused`` swaps in
PyTorch's fused kernels (scaled_dot_product_attention, F.layer_norm, F.gelu),
which compute the same functions to float rounding.

Shapes: B batch, T tokens, C = emb_dim, H = n_heads, D = C // H, V = vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from gptcli.config import ModelConfig
from gptcli.loading import key_mismatch


class LayerNorm(nn.Module):
    """The book's LayerNorm: biased variance, eps 1e-5, parameters `scale` and `shift`."""

    def __init__(self, emb_dim: int, fused: bool = False):
        super().__init__()
        self.eps = 1e-5
        self.fused = fused
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    """GELU, exact (erf) or the tanh approximation of Hendrycks & Gimpel used by GPT-2."""

    def __init__(self, approximate: str, fused: bool = False):
        super().__init__()
        self.approximate = approximate
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "exact":
            return F.gelu(x)
        if self.fused:
            return F.gelu(x, approximate="tanh")
        # The book's formula, op for op (F.gelu's tanh kernel rounds differently).
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))

    def extra_repr(self) -> str:
        return f"approximate={'none' if self.approximate == 'exact' else 'tanh'!r}"


DROPOUT_GRID = 1 << 16  # the fused CPU dropout's probability resolution: 16-bit draws


def dropout_on_grid(p: float) -> float | None:
    """The drop probability the fused CPU dropout applies for `p`: p rounded to a multiple of
    1/65536 (0.1 -> 0.10000610), or None where that rounding would reach 0 or 1."""
    steps = round(p * DROPOUT_GRID)
    return steps / DROPOUT_GRID if 0 < steps < DROPOUT_GRID else None


class _CpuDropout(torch.autograd.Function):
    """Inverted dropout from 16-bit random draws, keeping a one-byte mask for the backward pass.

    Each 64-bit draw of PyTorch's generator gives four 16-bit values, each compared with the
    threshold of the drop probability on a 1/65536 grid (`dropout_on_grid`); the kept values
    are scaled by 1 / (1 - that probability), so the expectation is exact. Where the grid cannot
    hold `p` (below 1/131072 or within that of 1), float32 uniform draws are compared instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        on_grid = dropout_on_grid(p)
        if on_grid is None:
            keep = torch.rand(x.shape, dtype=torch.float32, device=x.device) >= p
        else:
            n = x.numel()
            draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(1 << 63), None)
            values = draws.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
            keep = values >= round(on_grid * DROPOUT_GRID) - DROPOUT_GRID // 2
            p = on_grid
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return _CpuDropout.masked(x, keep, ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return _CpuDropout.masked(grad, keep, ctx.scale), None

    @staticmethod
    def masked(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        """x * keep * scale, the same numbers: a product of floats and bools runs unvectorised on the
        CPU (about 8x a float product), so the mask goes to x's dtype first; the scale stays a
        float32 multiply (a bf16 copy of it would be 0.2 % off)."""
        return (x * keep.view(torch.uint8).to(x.dtype)).mul_(scale)


class Dropout(nn.Dropout):
    """nn.Dropout; with `fused` on the CPU, a faster one with the same distribution.

    PyTorch's CPU dropout draws each mask with bernoulli_ and keeps it as floats for the
    backward pass. Comparing 16-bit draws with p (rounded to 1/65536) takes under a third of
    the time and the mask is kept as bools, a quarter of the memory. Its random numbers
    differ from the book's, so only ``impl: fused`` uses it; CUDA keeps PyTorch's fused kernel,
    and so does torch.compile, which fuses its own dropout into the graph (the in-place draw
    here would break the graph at every dropout, and the split graphs trained differently
    from run to run).
    """

    def __init__(self, p: float, fused: bool = False):
        super().__init__(p)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fused and self.training and self.p > 0 and x.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            return _CpuDropout.apply(x, self.p)
        return super().forward(x)


class KVCache:
    """Keys and values of every layer for incremental decoding: (B, H, S_max, D) each.

    The model writes the new tokens' keys/values at `pos` and advances `pos` after a
    forward pass, so a prompt is prefilled once and each later step costs one token.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_heads, max_len, cfg.emb_dim // cfg.n_heads)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > {self.max_len}")
        self.keys[layer][:, :, self.pos:end] = k
        self.values[layer][:, :, self.pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, t: int) -> None:
        """After a forward pass over `t` tokens: the next ones go after them."""
        self.pos += t


class StaticKVCache(KVCache):
    """A KV cache of fixed shapes that ``torch.compile`` can capture (litgpt's ``input_pos`` style).

    The caller sets `input_pos` (T,), the slots of the tokens it feeds, before each forward
    pass; keys/values are written there with ``index_copy_`` and attention always reads all
    `max_len` slots, so every decoding step has the same shapes and no Python int changes
    inside the model (a compiled step would be specialised, and recompiled, per position).
    The caller's `attn_mask` (B or 1, 1, T, max_len) must hide the slots not written yet;
    they start as zeros, so a hidden slot adds exactly 0 (an uninitialised NaN would not:
    0 x NaN = NaN in the weighted sum).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        super().__init__(cfg, batch_size, max_len, device, dtype)
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer.zero_()
        self.input_pos: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer].index_copy_(2, self.input_pos, k)
        self.values[layer].index_copy_(2, self.input_pos, v)
        return self.keys[layer], self.values[layer]

    def advance(self, t: int) -> None:
        """Nothing: the caller says where each token goes (`input_pos`)."""


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention (the book's chapter 3)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d_out = cfg.emb_dim
        self.layer = layer
        self.num_heads = cfg.n_heads
        self.head_dim = d_out // cfg.n_heads
        self.fused = cfg.impl == "fused"
        # Creation order W_query, W_key, W_value, out_proj is the book's: it fixes the init draws.
        self.W_query = nn.Linear(d_out, d_out, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(d_out, d_out, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(d_out, d_out, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = Dropout(cfg.drop_rate, self.fused)
        mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | BlockMask | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        b, t, c = x.shape
        # (B, T, C) -> (B, H, T, D). Keys first, as the book: the order in which x's three
        # uses run decides the order autograd sums their gradients (bit-exact runs need it).
        keys = self.W_key(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        if kv_cache is not None:
            keys, values = kv_cache.update(self.layer, keys, values)  # (B, H, S, D), S = start + T
            if attn_mask is None and t > 1:
                start = kv_cache.pos
                # Query i sits at absolute position start + i and sees keys 0..start + i.
                attn_mask = torch.ones(t, keys.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start)
        # On the CPU, SDPA falls back to its math kernel whenever dropout is on; the explicit
        # path is the same arithmetic with the faster dropout.
        explicit = not self.fused or (self.training and self.dropout.p > 0 and x.device.type == "cpu")
        if isinstance(attn_mask, BlockMask):
            # The document mask where flex_attention compiles (documents.flex_compiles, which
            # gives a BlockMask only when no attention dropout applies: flex has none).
            if x.device.type == "cpu":
                # torch 2.13's CPU flex template reads the (B, H, T, D) sizes off the buffer under a
                # view (cpp_flex_attention_template.py choose_flex_template): the (B*T, C) matmul
                # output under our transposed views fails to unpack. A copy is a 4-d buffer.
                queries, keys, values = queries.contiguous(), keys.contiguous(), values.contiguous()
            context = flex_attention(queries, keys, values, block_mask=attn_mask)
        elif attn_mask is None and kv_cache is None and explicit:
            context = (self._fused_attention if self.fused else self._book_attention)(queries, keys, values)
        else:
            drop = self.dropout.p if self.training else 0.0
            is_causal = attn_mask is None and kv_cache is None
            context = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal
            )
        # (B, H, T, D) -> (B, T, C)
        context = context.transpose(1, 2).reshape(b, t, c)
        return self.out_proj(context)

    def _book_attention(self, queries, keys, values) -> torch.Tensor:
        """Explicit masked softmax with dropout on the weights, as the book computes it."""
        t = queries.shape[2]
        attn_scores = queries @ keys.transpose(2, 3)  # (B, H, T, T)
        attn_scores.masked_fill_(self.mask[:t, :t], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values  # (B, H, T, D)

    def _fused_attention(self, queries, keys, values) -> torch.Tensor:
        """The book's attention with one pass fewer over the (B, H, T, T) scores forward and two
        backward: the 1/sqrt(D) scale goes on the queries (a power of two for D = 64: the same
        numbers), and the causal mask is filled outside autograd (the softmax's gradient is already
        zero where its output is, so the fill's backward pass, a masked copy, only repeated it)."""
        t = queries.shape[2]
        attn_scores = (queries * keys.shape[-1] ** -0.5) @ keys.transpose(2, 3)  # (B, H, T, T)
        with torch.no_grad():
            attn_scores.masked_fill_(self.mask[:t, :t], -torch.inf)
        attn_weights = self.dropout(torch.softmax(attn_scores, dim=-1))
        return attn_weights @ values  # (B, H, T, D)


class FeedForward(nn.Module):
    """Position-wise MLP: C -> 4C -> GELU -> C."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(cfg.gelu, fused=cfg.impl == "fused"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        fused = cfg.impl == "fused"
        self.att = MultiHeadAttention(cfg, layer)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim, fused)
        self.norm2 = LayerNorm(cfg.emb_dim, fused)
        self.drop_resid = Dropout(cfg.drop_rate, fused)

    def forward(self, x, attn_mask=None, kv_cache=None) -> torch.Tensor:
        x = x + self.drop_resid(self.att(self.norm1(x), attn_mask, kv_cache))
        x = x + self.drop_resid(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2 style decoder: token + position embeddings, blocks, final norm, untied head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        vocab = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(vocab, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = Dropout(cfg.drop_rate, cfg.impl == "fused")
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, i) for i in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim, cfg.impl == "fused")
        self.out_head = nn.Linear(cfg.emb_dim, vocab, bias=False)
        self.activation_checkpointing = False
        if cfg.init == "gpt2":
            self._init_gpt2()

    @torch.no_grad()
    def _init_gpt2(self, std: float = 0.02) -> None:
        """GPT-2's initialisation (model.init: gpt2), replacing PyTorch's defaults.

        Every Linear and Embedding weight ~ normal(0, 0.02), biases zero, LayerNorms
        as built (scale 1, shift 0). The two projections that add into the residual
        stream in each block (att.out_proj and the MLP's second Linear) get std
        0.02 / sqrt(2 * n_layers): GPT-2 (Radford et al. 2019, "Language Models are
        Unsupervised Multitask Learners", section 2.3) scales "the weights of residual
        layers at initialization by a factor of 1/sqrt(N) where N is the number of
        residual layers" -- two per block -- so the residual stream's variance does
        not grow with depth. nanoGPT's model.py (GPT._init_weights and its c_proj
        loop) applies the same scheme.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.trf_blocks:
            for proj in (block.att.out_proj, block.ff.layers[-1]):
                nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T); (B, 1, vocab_size) with `last_only`.

        Args:
            idx: token ids.
            positions: (B, T) or (T,) position of each token; default 0..T-1 after
                what `kv_cache` holds.
            attn_mask: (B, 1, T, S) boolean, True where a query may attend a key;
                default causal. Used for left-padded batches and document masks; a
                document mask may instead be a flex_attention BlockMask (``documents``).
            kv_cache: keys/values of earlier positions; advanced by T on return.
            last_only: compute the logits of the last position only (generation). The
                output head is a C x V matmul per position, the largest in the model.
            return_hidden: return the final norm's output (B, T, C) instead, the input of
                ``out_head``: training computes the head with its loss in slices
                (``loss.chunked_cross_entropy``), never holding the (B, T, V) logits.
            select: (B, K) positions whose logits to compute, (B, K, vocab_size) out
                (task scoring needs only the continuation's).
        """
        b, t = idx.shape
        if positions is None:
            start = kv_cache.pos if kv_cache is not None else 0
            positions = torch.arange(start, start + t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (B, T, C)
        x = self.drop_emb(x)
        for block in self.trf_blocks:
            if self.activation_checkpointing and self.training:
                # Recompute the block in backward (saves activations); RNG state is replayed.
                x = checkpoint(block, x, attn_mask, kv_cache, use_reentrant=False)
            else:
                x = block(x, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(t)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        if select is not None:
            x = x.gather(1, select[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, C)
        x = self.final_norm(x)
        if return_hidden:
            return x
        logits = self.out_head(x)  # (B, T, padded V)
        if logits.shape[-1] != self.cfg.vocab_size:
            logits = logits[..., : self.cfg.vocab_size]
        return logits

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, static: bool = False) -> KVCache:
        """An empty cache for `batch_size` sequences of up to `max_len` (default context) tokens.

        `static`: a StaticKVCache, for a compiled decoding step.
        """
        p = self.tok_emb.weight  # the activations' dtype (out_head may hold int8 weights when decoding)
        kind = StaticKVCache if static else KVCache
        return kind(self.cfg, batch_size, max_len or self.cfg.context_length, p.device, p.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops_per_token(cfg: ModelConfig, training: bool = True) -> float:
    """Model FLOPs per token (PaLM appendix B; Chinchilla's estimate without embeddings).

    A forward pass costs 2 FLOPs per multiply-accumulate: 2 * N for the weight
    matmuls (N = non-embedding parameters plus the output head) and
    2 * n_layers * T * C for attention scores and the weighted sum (causal masking
    is not subtracted, as in PaLM). Training (forward + backward) costs 3x that.
    """
    c, l_, t = cfg.emb_dim, cfg.n_layers, cfg.context_length
    per_block = 4 * c * c + 8 * c * c  # W_query/W_key/W_value/out_proj + the 4x MLP
    matmul_params = l_ * per_block + c * cfg.vocab_size  # + out_head
    forward = 2 * matmul_params + 2 * l_ * t * c * 2
    return (3 if training else 1) * forward


def unwrap(model: nn.Module) -> GPTModel:
    """The GPTModel inside DDP/FSDP/torch.compile wrappers (whose state_dicts add prefixes)."""
    while True:
        if isinstance(model, GPTModel):
            return model
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"not a GPTModel: {type(model).__name__}")
        model = inner


VOCAB_ROWS = ("tok_emb.weight", "out_head.weight")


def trim_vocab(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`sd` with the vocabulary-padding rows removed (what checkpoints store)."""
    return {k: v[: cfg.vocab_size] if k in VOCAB_ROWS else v for k, v in sd.items()}


def pad_vocab(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`sd` with zero rows appended up to the padded vocabulary (what the model holds)."""
    out = dict(sd)
    for key in VOCAB_ROWS:
        w = sd.get(key)
        if w is not None and w.dim() == 2 and w.shape[0] == cfg.vocab_size < cfg.padded_vocab_size:
            out[key] = torch.cat([w, w.new_zeros(cfg.padded_vocab_size - w.shape[0], w.shape[1])])
    return out


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's weights with vocabulary padding removed (vocab_size rows)."""
    gpt = unwrap(model)
    return trim_vocab({k: v.detach() for k, v in gpt.state_dict().items()}, gpt.cfg)


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load weights saved by `export_state_dict`, re-adding vocabulary padding as zeros.

    Raises:
        ValueError: naming each missing or unexpected tensor and each shape mismatch.
    """
    gpt = unwrap(model)
    own = gpt.state_dict()
    padded = pad_vocab(sd, gpt.cfg)
    problems = key_mismatch(own, sd)
    shapes = [f"{key}: shape {tuple(sd[key].shape)} in the file, {tuple(own[key].shape)} in the model"
              for key in sorted(set(own) & set(sd)) if padded[key].shape != own[key].shape]
    if shapes:  # a wrong width mismatches nearly every tensor: the first few say enough
        problems += shapes[:3] + ([f"{len(shapes) - 3} more tensors of other shapes"] if len(shapes) > 3 else [])
    if problems:
        raise ValueError("; ".join(problems))
    gpt.load_state_dict(padded, strict=True)

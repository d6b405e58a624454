"""Weights in other formats, converted to and from gptcli's (= the book's) names.

The book's .pth files, GPT-2's layout (OpenAI's TensorFlow checkpoints and Hugging
Face's port of it) and Hugging Face's config.json. Each reader returns a state_dict
in gptcli's names; the model's ``load_state_dict`` then checks every tensor's presence
and shape. Importing and exporting checkpoints is `weights`; downloads are `hub`.

GPT-2's own layout stores each projection as a Conv1D with weight (in, out), i.e. the
transpose of an nn.Linear weight, and fuses query, key and value into one ``c_attn``
of width 3C. ``_pairs`` is the one table of which tensor is which; import and export
both read it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from gptcli.config import Config, ModelConfig
from gptcli.errors import InputError, RunError, first_line
from gptcli.loading import key_mismatch, torch_load
from gptcli.model import GPTModel, export_state_dict, load_state_dict
from gptcli.tensorbundle import TensorBundle
from gptcli.tokenizer import END_OF_TEXT_ID, VOCAB_SIZE


# ---------------------------------------------------------------- the book's .pth


def load_book_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict the book's code saved (model.pth, or model_and_optimizer.pth).

    ``torch.load(weights_only=True)`` refuses pickles that would construct
    arbitrary objects or call functions; such a file is reported, never executed.

    Raises:
        InputError: the file is missing, refused, or holds no state_dict.
    """
    obj = torch_load(path, "state_dict", InputError)
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


# GPT-2 widths and their head counts (OpenAI's hparams; the book's GPT_CONFIG table).
GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}


def config_from_book_state_dict(sd: dict[str, torch.Tensor], n_heads: int | None, where: str) -> Config:
    """The config of a book model, read off its tensors' shapes.

    A .pth file holds no config. Sizes follow from the shapes; the head count
    does not (it only splits emb_dim), so it is GPT-2's for GPT-2's widths and
    must be given otherwise. The book's model uses the tanh GELU.
    """
    for key in ("tok_emb.weight", "pos_emb.weight"):
        if key not in sd or sd[key].dim() != 2:
            raise InputError(f"{where}: no {key} (not a state_dict of the book's GPTModel)")
    vocab, emb = sd["tok_emb.weight"].shape
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"trf_blocks\.(\d+)\.", k))})
    if n_heads is None:
        if emb not in GPT2_HEADS:
            raise InputError(f"{where}: emb_dim {emb} is not a GPT-2 width; give n_heads=N (the file does not say)")
        n_heads = GPT2_HEADS[emb]
    elif emb % n_heads:
        raise InputError(f"n_heads {n_heads}: {where} is {emb} wide (emb_dim), which {n_heads} heads do not divide",
                         param="n_heads")
    model = ModelConfig(
        vocab_size=vocab, context_length=sd["pos_emb.weight"].shape[0], emb_dim=emb, n_heads=n_heads,
        n_layers=len(layers), qkv_bias="trf_blocks.0.att.W_query.bias" in sd, gelu="tanh", impl="book",
    )
    return Config(model=model)


# ---------------------------------------------------------------- GPT-2's layout

# (ours, GPT-2's, stored transposed): per block, then the rest. The fused c_attn
# (W_query | W_key | W_value along the output) is handled beside the table.
GPT2_BLOCK_PAIRS = (
    ("norm1.scale", "ln_1.weight", False),
    ("norm1.shift", "ln_1.bias", False),
    ("att.out_proj.weight", "attn.c_proj.weight", True),
    ("att.out_proj.bias", "attn.c_proj.bias", False),
    ("norm2.scale", "ln_2.weight", False),
    ("norm2.shift", "ln_2.bias", False),
    ("ff.layers.0.weight", "mlp.c_fc.weight", True),
    ("ff.layers.0.bias", "mlp.c_fc.bias", False),
    ("ff.layers.2.weight", "mlp.c_proj.weight", True),
    ("ff.layers.2.bias", "mlp.c_proj.bias", False),
)
GPT2_TOP_PAIRS = (
    ("tok_emb.weight", "wte.weight", False),
    ("pos_emb.weight", "wpe.weight", False),
    ("final_norm.scale", "ln_f.weight", False),
    ("final_norm.shift", "ln_f.bias", False),
)
QKV = ("W_query", "W_key", "W_value")


def _pairs(n_layers: int) -> Iterator[tuple[str, str, bool]]:
    yield from GPT2_TOP_PAIRS
    for i in range(n_layers):
        for ours, theirs, transposed in GPT2_BLOCK_PAIRS:
            yield f"trf_blocks.{i}.{ours}", f"h.{i}.{theirs}", transposed


def to_gpt2_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """gptcli weights in GPT-2's names (no ``transformer.`` prefix) and Conv1D orientation.

    ``lm_head.weight`` is our (untied) output head; a model without q/k/v biases
    gets zero biases, which compute the same function.
    """
    out = {theirs: sd[ours].t() if transposed else sd[ours] for ours, theirs, transposed in _pairs(cfg.n_layers)}
    for i in range(cfg.n_layers):
        att = f"trf_blocks.{i}.att"
        out[f"h.{i}.attn.c_attn.weight"] = torch.cat([sd[f"{att}.{w}.weight"].t() for w in QKV], dim=1)  # (C, 3C)
        biases = [sd.get(f"{att}.{w}.bias") for w in QKV]
        if biases[0] is None:
            weight = sd[f"{att}.W_query.weight"]
            biases = [weight.new_zeros(weight.shape[0])] * 3
        out[f"h.{i}.attn.c_attn.bias"] = torch.cat(biases)
    out["lm_head.weight"] = sd["out_head.weight"]
    return out


def from_gpt2_state_dict(
    src: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str, tied: bool = True
) -> dict[str, torch.Tensor]:
    """gptcli weights from tensors in GPT-2's names (``transformer.`` prefix optional).

    Every tensor's shape is checked against `cfg` first, naming the tensor and
    both shapes. A `tied` head is ``wte`` (GPT-2's choice; a stored
    ``lm_head.weight`` is then ignored, as transformers ignores it), which our
    untied head holds as a copy; an untied one must be stored.

    Raises:
        InputError: a tensor is missing, unexpected, or of the wrong shape.
    """
    names = {k.removeprefix("transformer."): k for k in src}
    # Drop the causal-mask buffers older transformers saved, and a tied head's copy.
    names = {k: v for k, v in names.items()
             if not re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", k) and not (tied and k == "lm_head.weight")}
    expected = _gpt2_shapes(cfg)
    if tied:
        expected.pop("lm_head.weight")
    mismatch = key_mismatch(expected, names)
    if mismatch:
        raise InputError(f"{where}: not the tensors of this GPT-2 shape ({'; '.join(mismatch)})")

    def get(name: str) -> torch.Tensor:
        t = src[names[name]]
        if name in ("wte.weight", "lm_head.weight") and t.dim() == 2 and t.shape[0] == cfg.padded_vocab_size:
            t = t[: cfg.vocab_size]  # a padded vocabulary's rows beyond the tokenizer's: no token has them
        if tuple(t.shape) != expected[name]:
            raise InputError(f"{where}: {names[name]} has shape {tuple(t.shape)}, expected {expected[name]}")
        return t.float() if t.is_floating_point() else t

    c = cfg.emb_dim
    out = {ours: get(theirs).t().contiguous() if transposed else get(theirs) for ours, theirs, transposed
           in _pairs(cfg.n_layers)}
    for i in range(cfg.n_layers):
        weight, bias = get(f"h.{i}.attn.c_attn.weight"), get(f"h.{i}.attn.c_attn.bias")
        for j, w in enumerate(QKV):
            out[f"trf_blocks.{i}.att.{w}.weight"] = weight[:, j * c:(j + 1) * c].t().contiguous()
            out[f"trf_blocks.{i}.att.{w}.bias"] = bias[j * c:(j + 1) * c].clone()
    out["out_head.weight"] = out["tok_emb.weight"].clone() if tied else get("lm_head.weight")
    if not cfg.qkv_bias:  # exported with zero biases (to_gpt2_state_dict): only zeros compute the same function
        for i in range(cfg.n_layers):
            for w in QKV:
                bias = out.pop(f"trf_blocks.{i}.att.{w}.bias")
                if bias.any():
                    raise InputError(f"{where}: h.{i}.attn.c_attn.bias is not zero, but the config says qkv_bias false")
    return out


def _gpt2_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every GPT-2 tensor for `cfg`: our model's, run through the export mapping."""
    with torch.device("meta"):
        sd = export_state_dict(GPTModel(cfg))
    return {k: tuple(v.shape) for k, v in to_gpt2_state_dict(sd, cfg).items()}


def check_fits(weights: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    """Raise InputError unless `weights` load into GPTModel(cfg): every tensor present, none extra, shapes equal."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta parameters is a no-op: only the checks run
        try:
            load_state_dict(model, weights)
        except ValueError as e:
            raise InputError(f"{where}: {e}") from None


def gpt2_config(
    emb_dim: int, n_layers: int, n_heads: int, context_length: int = 1024, vocab_size: int = 50257,
    gelu: str = "tanh", drop_rate: float = 0.1,
) -> Config:
    """A config for GPT-2 weights: configs/gpt2-*.yaml's model section (biased q/k/v, fused kernels)."""
    model = ModelConfig(
        vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim, n_heads=n_heads, n_layers=n_layers,
        drop_rate=drop_rate, qkv_bias=True, gelu=gelu, impl="fused",
    )
    return Config(model=model)


# ---------------------------------------------------------------- Hugging Face

# transformers' ACT2FN names of the GELUs: "gelu" is exact (erf); the others are
# the tanh approximation (gelu_new and gelu_fast are the same formula written twice).
HF_GELU = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
GPTCLI_KEY = "gptcli"  # config.json: the model fields of a gptcli export that GPT-2's config has no name for
GPTCLI_FIELDS = ("qkv_bias", "impl", "pad_vocab_multiple", "init")


def _pad_multiple(padded: int) -> int:
    """The pad_vocab_multiple that rounds GPT-2's VOCAB_SIZE up to `padded`: a power of two if one does, else `padded`."""
    return next((m for m in (2 ** k for k in range(1, 17)) if -(-VOCAB_SIZE // m) * m == padded), padded)


def config_from_hf(hf: dict[str, Any], where: str) -> Config:
    """Our config for a transformers GPT2Config dict; anything our model cannot compute is refused.

    Raises:
        InputError: not GPT-2, or a variant (activation, epsilon, inner width,
            attention scaling, cross-attention) our model does not implement.
    """
    if hf.get("model_type") != "gpt2":
        raise InputError(f"{where}: model_type {hf.get('model_type')!r}; only GPT-2 ('gpt2') can be imported")
    try:
        emb = int(hf.get("n_embd", 768))
        act = hf.get("activation_function", "gelu_new")
        checks = [
            (act in HF_GELU, f"activation_function {act!r} (supported: {', '.join(HF_GELU)})"),
            (abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12, "layer_norm_epsilon other than 1e-5"),
            (hf.get("n_inner") in (None, 4 * emb), f"n_inner {hf.get('n_inner')} (our MLP is 4 x n_embd)"),
            (hf.get("scale_attn_weights", True), "scale_attn_weights false"),
            (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx"),
            (not hf.get("add_cross_attention", False), "add_cross_attention"),
        ]
        for ok, what in checks:
            if not ok:
                raise InputError(f"{where}: {what} is not supported by gptcli's model")
        cfg = gpt2_config(
            emb_dim=emb, n_layers=int(hf.get("n_layer", 12)), n_heads=int(hf.get("n_head", 12)),
            context_length=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            vocab_size=int(hf.get("vocab_size", 50257)), gelu=HF_GELU[act],
            drop_rate=float(hf.get("resid_pdrop", 0.1)),
        )
        if cfg.model.vocab_size > VOCAB_SIZE:  # nanoGPT/llm.c pad GPT-2's vocabulary (50304): rows no token uses
            cfg.model = dataclasses.replace(cfg.model, vocab_size=VOCAB_SIZE,
                                            pad_vocab_multiple=_pad_multiple(cfg.model.vocab_size))
        ours = hf.get(GPTCLI_KEY) or {}
        if not isinstance(ours, dict) or set(ours) - set(GPTCLI_FIELDS):
            raise InputError(f"{where}: {GPTCLI_KEY!r} holds {ours!r}; expected some of {', '.join(GPTCLI_FIELDS)}")
        return Config(model=dataclasses.replace(cfg.model, **ours))
    except (TypeError, ValueError) as e:  # a malformed number, or ModelConfig's own checks
        raise InputError(f"{where}: {first_line(e)}") from None


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' config.json for our model (GPT2LMHeadModel with an untied head)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu" if cfg.gelu == "exact" else "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": END_OF_TEXT_ID if cfg.vocab_size > END_OF_TEXT_ID else None,
        "eos_token_id": END_OF_TEXT_ID if cfg.vocab_size > END_OF_TEXT_ID else None,
        "tie_word_embeddings": False,  # our output head is its own matrix
        "torch_dtype": "float32",
        # What GPT2Config cannot say, so that `gptcli import` gives back this model's config
        # (transformers keeps unknown keys as attributes and ignores them).
        GPTCLI_KEY: {name: getattr(cfg, name) for name in GPTCLI_FIELDS},
    }


class _LazyTensors(Mapping):
    """Tensors of safetensors files (one, or the shards an index names), read on access."""

    def __init__(self, files: list[Path]):
        self.handles, self.where = [], {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise RunError(f"{f}: unreadable safetensors file ({first_line(e)}); truncated or corrupted?") from None
            self.handles.append(handle)
            self.where.update({k: handle for k in handle.keys()})
        self.files = files

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self.where[key].get_tensor(key)
        except SafetensorError as e:
            raise RunError(f"{key}: unreadable tensor ({first_line(e)}); truncated or corrupted file?") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def read_hf_tensors(directory: Path) -> Mapping[str, torch.Tensor]:
    """The tensors of a Hugging Face model directory: model.safetensors, its shards, or pytorch_model.bin.

    Raises:
        RunError: an unreadable (e.g. truncated) file.
    """
    if (directory / "model.safetensors").is_file():
        return _LazyTensors([directory / "model.safetensors"])
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise RunError(f"{index}: unreadable shard index") from None
        return _LazyTensors([directory / s for s in shards])
    path = directory / "pytorch_model.bin"
    sd = torch_load(path, "state_dict")  # no mmap: 2019-era files predate zip
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RunError(f"{path}: not a state_dict of tensors")
    return sd


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: unreadable JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------- OpenAI's TensorFlow checkpoints


class OpenAITensors(Mapping):
    """An OpenAI checkpoint seen through GPT-2's Hugging Face names (model/h0/attn/c_attn/w ->
    h.0.attn.c_attn.weight; conv1d weights [1, in, out] -> [in, out])."""

    def __init__(self, bundle: TensorBundle):
        self.bundle = bundle
        self.names = {}
        for key in bundle:
            if key in ("model/wte", "model/wpe"):
                self.names[f"{key.removeprefix('model/')}.weight"] = key
                continue
            m = re.fullmatch(r"model/(?:h(\d+)/)?(.+)/([gbw])", key)
            if m is None:
                self.names[key] = key  # reported as unexpected
                continue
            layer, module, kind = m.groups()
            suffix = "bias" if kind == "b" else "weight"
            self.names[f"{'' if layer is None else f'h.{layer}.'}{module.replace('/', '.')}.{suffix}"] = key

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.bundle[self.names[name]]
        return t.squeeze(0) if t.dim() == 3 and t.shape[0] == 1 else t

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def config_from_openai(hparams: dict[str, Any], where: str) -> Config:
    """OpenAI's hparams.json (n_vocab, n_ctx, n_embd, n_head, n_layer) as our config."""
    try:
        return gpt2_config(
            emb_dim=int(hparams["n_embd"]), n_layers=int(hparams["n_layer"]), n_heads=int(hparams["n_head"]),
            context_length=int(hparams["n_ctx"]), vocab_size=int(hparams["n_vocab"]),
        )
    except KeyError as e:
        raise InputError(f"{where}: missing {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: {first_line(e)}") from None

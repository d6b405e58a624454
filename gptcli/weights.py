"""Weights in other formats: the book's .pth files, Hugging Face and OpenAI GPT-2.

Each importer returns a state_dict in gptcli's (= the book's) names; the model's
``load_state_dict`` then checks every tensor's presence and shape. Imported models
become ordinary gptcli checkpoint directories (``checkpoints/pretrained/NAME/``)
that generate, eval, loss and ``train --init-from`` read like any other.

GPT-2's own layout (OpenAI's TensorFlow code, and Hugging Face's port of it) stores
each projection as a Conv1D with weight (in, out), i.e. the transpose of an
nn.Linear weight, and fuses query, key and value into one ``c_attn`` of width 3C.
``GPT2_PAIRS`` is the one table of which tensor is which; import and export both
read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from gptcli import download as dl
from gptcli.checkpoint import MANIFEST, load_checkpoint, save_checkpoint, save_weights_file, verify_checkpoint
from gptcli.config import Config, ConfigError, ModelConfig
from gptcli.download import fsync_dir
from gptcli.errors import InputError, RunError, first_line
from gptcli.model import GPTModel, export_state_dict, load_state_dict
from gptcli.tensorbundle import TensorBundle
from gptcli.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, bpe_files


# ---------------------------------------------------------------- the book's .pth


def load_book_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict the book's code saved (model.pth, or model_and_optimizer.pth).

    ``torch.load(weights_only=True)`` refuses pickles that would construct
    arbitrary objects or call functions; such a file is reported, never executed.

    Raises:
        InputError: the file is missing, refused, or holds no state_dict.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except Exception as e:
        raise InputError(
            f"{path}: refused to load ({type(e).__name__}: {first_line(e)}); "
            "only plain tensors are read from .pth files"
        ) from None
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
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        what = [f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"] if missing else []
        what += [f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"] if unexpected else []
        raise InputError(f"{where}: not the tensors of this GPT-2 shape ({'; '.join(what)})")

    def get(name: str) -> torch.Tensor:
        t = src[names[name]]
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
        ours = hf.get(GPTCLI_KEY) or {}
        if not isinstance(ours, dict) or set(ours) - {"qkv_bias", "impl"}:
            raise InputError(f"{where}: {GPTCLI_KEY!r} holds {ours!r}; expected qkv_bias and impl")
        return Config(model=dataclasses.replace(cfg.model, **ours))
    except (TypeError, ValueError, ConfigError) as e:  # a malformed number, or ModelConfig's own checks
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
        GPTCLI_KEY: {"qkv_bias": cfg.qkv_bias, "impl": cfg.impl},
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
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # no mmap: 2019-era files predate zip
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        raise RunError(f"{path}: refused or unreadable ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RunError(f"{path}: not a state_dict of tensors")
    return sd


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: unreadable JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------- OpenAI's TensorFlow checkpoints


class _OpenAITensors(Mapping):
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
    except (TypeError, ValueError, ConfigError) as e:
        raise InputError(f"{where}: {first_line(e)}") from None


# ---------------------------------------------------------------- import


@dataclass
class Imported:
    """Converted weights (our names), their config, and where they came from."""

    weights: dict[str, torch.Tensor]
    config: Config
    source: dict[str, Any]
    name: str = ""  # the source's name: its directory, or a .pth file's stem


FORMATS_HELP = (
    "a Hugging Face GPT-2 directory (config.json with model.safetensors or pytorch_model.bin), "
    "an OpenAI checkpoint directory (hparams.json, model.ckpt.index, model.ckpt.data-*) "
    "or a book model.pth file"
)


def import_weights(path: Path, n_heads: int | None = None) -> Imported:
    """Read GPT-2 weights from a local source and convert them to gptcli's names and config.

    Args:
        path: a Hugging Face directory, an OpenAI checkpoint directory, or a book
            .pth file (see FORMATS_HELP).
        n_heads: attention heads, for a book .pth whose width is not a GPT-2 width
            (other formats state it; a different value is refused).

    Raises:
        InputError: `path` is none of the formats, or its tensors do not fit its config.
        RunError: a file is unreadable (truncated, corrupted).
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".pth", ".pt"):
        sd = from_book_state_dict(load_book_state_dict(path))
        cfg = config_from_book_state_dict(sd, n_heads, str(path))
        imported = Imported(sd, cfg, {"format": "book", "path": str(path.resolve())})
    elif path.is_file() and path.name in HF_WEIGHT_FILES:
        return import_weights(path.parent, n_heads)
    elif path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in HF_WEIGHT_FILES):
        hf = _read_json(path / "config.json")
        cfg = config_from_hf(hf, str(path / "config.json"))
        tied = bool(hf.get("tie_word_embeddings", True))
        weights = from_gpt2_state_dict(read_hf_tensors(path), cfg.model, str(path), tied)
        imported = Imported(weights, cfg, {"format": "huggingface", "path": str(path.resolve())})
    elif path.is_dir() and (path / "hparams.json").is_file() and list(path.glob("*.index")):
        indexes = sorted(path.glob("*.index"))
        prefix = path / "model.ckpt" if (path / "model.ckpt.index").is_file() else indexes[0].with_suffix("")
        cfg = config_from_openai(_read_json(path / "hparams.json"), str(path / "hparams.json"))
        weights = from_gpt2_state_dict(_OpenAITensors(TensorBundle(prefix)), cfg.model, str(prefix))
        imported = Imported(weights, cfg, {"format": "openai-tensorflow", "path": str(path.resolve())})
    elif not path.exists():
        raise InputError(f"{path}: no such file or directory")
    elif (path / MANIFEST).is_file():
        raise InputError(f"{path}: already a gptcli checkpoint (use it directly)")
    else:
        raise InputError(f"{path}: not a format gptcli imports (looked for {FORMATS_HELP})")
    imported.name = path.resolve().stem if path.is_file() else path.resolve().name
    if n_heads is not None and n_heads != imported.config.model.n_heads:
        raise InputError(f"n_heads {n_heads}: {path} states {imported.config.model.n_heads} heads", param="n_heads")
    check_fits(imported.weights, imported.config.model, str(path))
    return imported


def save_imported(imported: Imported, out: Path, name: str, overwrite: bool = False) -> Path:
    """Write `imported` as a gptcli checkpoint directory `out` (weights, config.yaml, manifest).

    Args:
        imported: what import_weights (or a download) produced.
        out: the directory; a download's DOWNLOADS folder inside it is left alone.
        name: recorded in the manifest as ``pretrained``, beside the source.
        overwrite: replace what `out` holds (only after the conversion succeeded).

    Raises:
        InputError: `out` holds other files and `overwrite` is false.
    """
    existing = [p for p in out.iterdir() if p.name != DOWNLOADS] if out.is_dir() else []
    if existing and not overwrite:
        raise InputError(f"{out}: exists and is not empty; pass overwrite=True to replace it")
    for p in existing:  # the new weights are converted: only now is the old content given up
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return save_checkpoint(out, ".", imported.weights, imported.config, None,
                           {"pretrained": name, "source": imported.source})


# ---------------------------------------------------------------- download


@dataclass(frozen=True)
class Pretrained:
    """One of OpenAI's GPT-2 releases and where it is published."""

    name: str
    params: str  # OpenAI's directory name
    emb_dim: int
    n_layers: int
    n_heads: int
    hub_repo: str
    vocab_size: int = 50257
    context_length: int = 1024

    def config(self) -> Config:
        return gpt2_config(self.emb_dim, self.n_layers, self.n_heads, self.context_length, self.vocab_size)


PRETRAINED = {p.name: p for p in (
    Pretrained("gpt2-small", "124M", 768, 12, 12, "openai-community/gpt2"),
    Pretrained("gpt2-medium", "355M", 1024, 24, 16, "openai-community/gpt2-medium"),
    Pretrained("gpt2-large", "774M", 1280, 36, 20, "openai-community/gpt2-large"),
    Pretrained("gpt2-xl", "1558M", 1600, 48, 25, "openai-community/gpt2-xl"),
)}
SOURCES = ("hf", "openai")
HF_ENDPOINT = "https://huggingface.co"
# Where the book's ch05 gpt_download.py fetches OpenAI's files (base_url there).
OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_FILES = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")
DOWNLOADS = ".download"  # inside the target directory; removed once the checkpoint is written
FileProgress = Callable[[str, int, Optional[int]], None]  # (file name, bytes done, total or None)


def pretrained_spec(name: str) -> Pretrained:
    if name not in PRETRAINED:
        raise InputError(f"unknown model {name!r}; choose one of {', '.join(PRETRAINED)}")
    return PRETRAINED[name]


def download_pretrained(
    name: str,
    out: Path,
    *,
    source: str = "hf",
    revision: str = "main",
    endpoint: str | None = None,
    overwrite: bool = False,
    progress: FileProgress | None = None,
) -> dict[str, Any]:
    """Download GPT-2 weights, verify them, and convert them into the checkpoint directory `out`.

    Returns {"checkpoint", "name", "source", "downloaded"}; "downloaded" is false
    when `out` already held the checkpoint (it is then left as it is).

    From the Hugging Face hub (``source="hf"``) the file is pinned: the revision is
    resolved to its commit, the file is fetched at that commit and checked against
    the sha256 the hub publishes for it (``X-Linked-Etag``, the hash git-lfs
    stores, which huggingface_hub reads as the file's ETag). OpenAI's files (``source="openai"``)
    publish no hash: their size is checked against the server's Content-Length and
    each tensor's CRC-32C against the one TensorFlow wrote into the index. Partial
    downloads resume; a file that fails its check is deleted.

    Args:
        name: one of PRETRAINED.
        out: the checkpoint directory to write.
        source: "hf" or "openai".
        revision: hub branch, tag or commit (hf only).
        endpoint: base URL of the hub (default $HF_ENDPOINT or huggingface.co) or of
            OpenAI's model folders (default OPENAI_URL); a mirror or a test server.
        overwrite: replace an existing checkpoint in `out`.
        progress: called with (file name, bytes done, total) as data arrives.

    Raises:
        InputError: unknown name or source, or `out` taken.
        RunError: offline, a server error, or a file failing verification.
    """
    spec = pretrained_spec(name)
    if source not in SOURCES:
        raise InputError(f"source {source!r}: choose one of {', '.join(SOURCES)}", param="source")
    if (out / MANIFEST).is_file() and not overwrite:
        manifest = verify_checkpoint(out, check_hashes=False)
        return {"checkpoint": out, "name": name, "source": manifest.get("source"), "downloaded": False}
    if out.is_dir() and any(p.name != DOWNLOADS for p in out.iterdir()) and not overwrite:
        raise InputError(f"{out}: exists and is not a checkpoint; pass overwrite=True to replace it")
    cache = out / DOWNLOADS
    cfg = spec.config()
    if source == "hf":
        base = (endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
        path, facts = _download_from_hub(base, spec, revision, cache, progress)
        weights = from_gpt2_state_dict(read_hf_tensors(path.parent), cfg.model, str(path))
    else:
        base = (endpoint or OPENAI_URL).rstrip("/")
        facts = _download_from_openai(base, spec, cache, progress)
        got = config_from_openai(_read_json(cache / "hparams.json"), str(cache / "hparams.json"))
        if got.model.shape() != cfg.model.shape():
            raise RunError(f"{base}/{spec.params}/hparams.json: describes {got.model.shape()}, not {name}")
        weights = from_gpt2_state_dict(_OpenAITensors(TensorBundle(cache / "model.ckpt")), cfg.model, str(cache))
    check_fits(weights, cfg.model, name)
    saved = save_imported(Imported(weights, cfg, facts), out, name, overwrite=True)
    shutil.rmtree(cache, ignore_errors=True)
    fsync_dir(out)
    return {"checkpoint": saved, "name": name, "source": facts, "downloaded": True}


def _download_from_hub(base: str, spec: Pretrained, revision: str, cache: Path, progress) -> tuple[Path, dict]:
    """Fetch model.safetensors at the commit `revision` resolves to, sha256-verified."""
    filename = "model.safetensors"
    url = f"{base}/{spec.hub_repo}/resolve/{revision}/{filename}"
    status, headers = dl.head(url, follow_redirects=False)
    for _ in range(5):  # relative redirects are renamed repositories; absolute ones lead to the file store
        location = headers.get("location", "")
        if not (300 <= status < 400 and location.startswith("/")):
            break
        url = base + location
        status, headers = dl.head(url, follow_redirects=False)
    commit = headers.get("x-repo-commit")
    etag = re.sub(r'^(W/)?"|"$', "", headers.get("x-linked-etag") or headers.get("etag") or "")
    if not re.fullmatch(r"[0-9a-f]{64}", etag):
        raise RunError(f"{url}: the hub published no sha256 for the file (ETag {etag!r}); refusing an unverified download")
    size = headers.get("x-linked-size") or (headers.get("content-length") if status == 200 else None)
    pinned = f"{base}/{spec.hub_repo}/resolve/{commit or revision}/{filename}"
    dest = dl.download(pinned, cache / filename, sha256=etag, size=int(size) if size else None,
                       progress=_labelled(progress, filename))
    return dest, {"format": "huggingface", "repo": spec.hub_repo, "revision": commit or revision,
                  "url": pinned, "sha256": etag}


def _download_from_openai(base: str, spec: Pretrained, cache: Path, progress) -> dict:
    """Fetch OpenAI's hparams, index and data files, each checked against the server's size."""
    sizes = {}
    for filename in OPENAI_FILES:
        url = f"{base}/{spec.params}/{filename}"
        _, headers = dl.head(url)
        size = headers.get("content-length")
        if size is None:
            raise RunError(f"{url}: the server states no size; refusing an unverifiable download")
        dl.download(url, cache / filename, size=int(size), progress=_labelled(progress, filename))
        sizes[filename] = int(size)
    return {"format": "openai-tensorflow", "url": f"{base}/{spec.params}/", "bytes": sizes,
            "verified": "size, per-tensor CRC-32C"}


def _labelled(progress: FileProgress | None, label: str):
    return None if progress is None else lambda done, total: progress(label, done, total)


# ---------------------------------------------------------------- export


HF_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "bos_token": END_OF_TEXT,
    "eos_token": END_OF_TEXT,
    "unk_token": END_OF_TEXT,
    "add_prefix_space": False,
    "errors": "replace",
}


def export_hf(checkpoint: Path, out: Path, overwrite: bool = False) -> Path:
    """Write a checkpoint as a Hugging Face GPT-2 directory that transformers loads offline.

    Files: config.json, model.safetensors (GPT2LMHeadModel names, untied lm_head),
    vocab.json and merges.txt (GPT-2's BPE, the same verified files gptcli's
    tokenizer uses), tokenizer_config.json and special_tokens_map.json. The
    directory is written beside `out` and renamed into place.

    Raises:
        InputError: `out` exists and `overwrite` is false.
        RunError: the checkpoint is missing or damaged, or the disk fails.
    """
    if out.exists() and not overwrite:
        raise InputError(f"{out}: exists; pass overwrite=True to replace it")
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config.model
    try:
        check_fits(ckpt.weights, cfg, str(ckpt.path / "model.safetensors"))
    except InputError as e:
        raise RunError(f"{e} (the weights do not fit the checkpoint's config.yaml)") from None
    # GPT2LMHeadModel's names: the body under "transformer.", the head beside it.
    tensors = {(k if k == "lm_head.weight" else f"transformer.{k}"): v.contiguous()
               for k, v in to_gpt2_state_dict(ckpt.weights, cfg).items()}
    vocab_bpe, encoder_json = bpe_files()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-export-{out.name}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_weights_file(tensors, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(encoder_json, tmp / "vocab.json")
        shutil.copyfile(vocab_bpe, tmp / "merges.txt")
        tok = {**HF_TOKENIZER_CONFIG, "model_max_length": cfg.context_length}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n", encoding="utf-8")
        special = {k: END_OF_TEXT for k in ("bos_token", "eos_token", "unk_token")}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"{out}: cannot write the export ({e.strerror or e})") from None
    return out

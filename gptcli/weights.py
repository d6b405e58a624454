"""Importing and exporting weights: other formats in, gptcli checkpoints out, and back.

`import_weights` reads a local Hugging Face, OpenAI or book source (through `convert`)
and `save_imported` writes it as an ordinary gptcli checkpoint directory
(``checkpoints/pretrained/NAME/``) that generate, eval, loss and ``train --init-from``
read like any other. `export_hf` writes a checkpoint as a Hugging Face GPT-2 directory.
Downloads of OpenAI's releases are `hub`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptcli.checkpoint import MANIFEST, load_checkpoint, save_checkpoint, save_weights_file
from gptcli.config import Config
from gptcli.convert import (HF_WEIGHT_FILES, OpenAITensors, read_json, check_fits, config_from_book_state_dict,
                            config_from_hf, config_from_openai, from_book_state_dict, from_gpt2_state_dict, hf_config,
                            load_book_state_dict, read_hf_tensors, to_gpt2_state_dict)
from gptcli.errors import InputError, RunError
from gptcli.fsio import fsync_dir, write_synced
from gptcli.tensorbundle import TensorBundle
from gptcli.tokenizer import END_OF_TEXT, bpe_files

DOWNLOADS = ".download"  # a download's folder inside the target directory; removed once the checkpoint is written


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
        hf = read_json(path / "config.json")
        cfg = config_from_hf(hf, str(path / "config.json"))
        tied = bool(hf.get("tie_word_embeddings", True))
        weights = from_gpt2_state_dict(read_hf_tensors(path), cfg.model, str(path), tied)
        imported = Imported(weights, cfg, {"format": "huggingface", "path": str(path.resolve())})
    elif path.is_dir() and (path / "hparams.json").is_file() and list(path.glob("*.index")):
        indexes = sorted(path.glob("*.index"))
        prefix = path / "model.ckpt" if (path / "model.ckpt.index").is_file() else indexes[0].with_suffix("")
        cfg = config_from_openai(read_json(path / "hparams.json"), str(path / "hparams.json"))
        weights = from_gpt2_state_dict(OpenAITensors(TensorBundle(prefix)), cfg.model, str(prefix))
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
        write_synced(tmp / "config.json", json.dumps(hf_config(cfg), indent=2) + "\n")
        shutil.copyfile(encoder_json, tmp / "vocab.json")
        shutil.copyfile(vocab_bpe, tmp / "merges.txt")
        tok = {**HF_TOKENIZER_CONFIG, "model_max_length": cfg.context_length}
        write_synced(tmp / "tokenizer_config.json", json.dumps(tok, indent=2) + "\n")
        special = {k: END_OF_TEXT for k in ("bos_token", "eos_token", "unk_token")}
        write_synced(tmp / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"{out}: cannot write the export ({e.strerror or e})") from None
    return out

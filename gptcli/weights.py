"""Importing and exporting weights: other formats in, gptcli checkpoints out, and back.

`import_weights` reads a local Hugging Face, OpenAI or book source (through `convert`)
and `save_imported` writes it as an ordinary gptcli checkpoint directory
(``checkpoints/pretrained/NAME/``) that generate, eval, loss and ``train --init-from``
read like any other. `export_hf` writes a checkpoint as a Hugging Face GPT-2 directory.
Downloads of OpenAI's releases are `hub`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from gptcli.checkpoint import MANIFEST, Checkpoint, load_checkpoint, save_checkpoint, save_weights_file
from gptcli.config import Config
from gptcli.convert import (GPTCLI_KEY, HF_WEIGHT_FILES, OpenAITensors, read_json, check_fits, config_from_book_state_dict,
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


def check_import_target(out: Path, overwrite: bool = False) -> None:
    """Refuse `out` unless writing an imported checkpoint there destroys nothing gptcli did not write.

    An earlier import or download (a manifest naming the model it holds as ``pretrained``, and
    only the files that manifest lists) is replaced with `overwrite`; an empty folder is taken;
    anything else, a training run included, is refused and left untouched.

    Raises:
        InputError: `out` is not a directory, holds files an import did not write, or holds an
            earlier import and `overwrite` is false.
    """
    listed: set[str] = set()
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if isinstance(manifest, dict) and "pretrained" in manifest and isinstance(manifest.get("files"), dict):
            listed = set(manifest["files"]) | {MANIFEST}
    except (OSError, ValueError):
        pass
    _check_target(out, overwrite, "an imported checkpoint", "import", listed, lambda: bool(listed),
                  ignore=lambda p: p.name == DOWNLOADS or p.name.startswith(".tmp-"))


def _check_target(out: Path, overwrite: bool, held: str, command: str, own_files, is_ours,
                  ignore=lambda p: False) -> None:
    """The one rule of import and export targets: missing or empty is taken; only files `command`
    writes (`own_files`, and `is_ours()` true of them) are replaced, and only with `overwrite`;
    anything else is refused, naming it, and nothing is deleted."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; choose another name (nothing was deleted)")
    entries = [p for p in out.iterdir() if not ignore(p)]
    foreign = sorted(p.name for p in entries if p.name not in own_files or not p.is_file() or p.is_symlink())
    if entries and not foreign and not is_ours():
        foreign = [f"{' and '.join(sorted(p.name for p in entries))} (not marked as gptcli's)"]
    if foreign:
        raise InputError(f"{out}: holds {_names(foreign)}, which no gptcli {command} wrote; "
                         "choose another directory (nothing was deleted)")
    if entries and not overwrite:
        raise InputError(f"{out}: holds {held}; pass overwrite=True to replace it")


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def save_imported(imported: Imported, out: Path, name: str, overwrite: bool = False) -> Path:
    """Write `imported` as a gptcli checkpoint directory `out` (weights, config.yaml, manifest).

    Args:
        imported: what import_weights (or a download) produced.
        out: the directory; a download's DOWNLOADS folder inside it is left alone.
        name: recorded in the manifest as ``pretrained``, beside the source.
        overwrite: replace an earlier import in `out` (only after the conversion succeeded).

    Raises:
        InputError: `out` holds what check_import_target refuses.
    """
    check_import_target(out, overwrite)
    existing = [p for p in out.iterdir() if p.name != DOWNLOADS and not p.name.startswith(".tmp-")] \
        if out.is_dir() else []
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    # Written beside the earlier import and moved over it (manifest last): a full disk keeps the earlier one.
    try:
        saved = save_checkpoint(out, ".", imported.weights, imported.config, None,
                                {"pretrained": name, "source": imported.source})
    except RunError:
        for folder in created:  # a failed import leaves no empty folder it made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    written = {MANIFEST, *json.loads((saved / MANIFEST).read_text(encoding="utf-8"))["files"]}
    for p in existing:  # an earlier import's own files that the new one does not replace
        if p.name not in written:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return saved


# ---------------------------------------------------------------- export


HF_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "bos_token": END_OF_TEXT,
    "eos_token": END_OF_TEXT,
    "unk_token": END_OF_TEXT,
    "add_prefix_space": False,
    "errors": "replace",
}


EXPORT_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                "special_tokens_map.json")


def check_export_target(out: Path, overwrite: bool = False) -> None:
    """Refuse `out` unless an export there destroys nothing gptcli did not write.

    An earlier export (only EXPORT_FILES, its config.json carrying the ``gptcli`` entry) is
    replaced with `overwrite`; a missing or empty folder is taken; anything else is refused.

    Raises:
        InputError: `out` is a file, holds anything an export did not write, or holds an
            earlier export and `overwrite` is false.
    """
    def is_ours() -> bool:
        try:
            return isinstance(read_json(out / "config.json").get(GPTCLI_KEY), dict)
        except InputError:
            return False

    _check_target(out, overwrite, "an earlier export", "export", EXPORT_FILES, is_ours)


def export_hf(checkpoint: Path | Checkpoint, out: Path, overwrite: bool = False) -> Path:
    """Write a checkpoint as a Hugging Face GPT-2 directory that transformers loads offline.

    Files: config.json, model.safetensors (GPT2LMHeadModel names, untied lm_head),
    vocab.json and merges.txt (GPT-2's BPE, the same verified files gptcli's
    tokenizer uses), tokenizer_config.json and special_tokens_map.json. The
    directory is written beside `out` and renamed into place.

    Args:
        checkpoint: a checkpoint or run directory (its newest step that verifies), or a loaded Checkpoint.
        out: the directory to write.
        overwrite: replace an earlier export in `out`.

    Raises:
        InputError: `out` is refused by check_export_target.
        RunError: the checkpoint is missing or damaged, or the disk fails.
    """
    check_export_target(out, overwrite)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
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
        check_export_target(out, overwrite)  # again: the folder may have changed while the weights were written
        old = out.parent / f".old-export-{out.name}"
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(out.parent)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(f"{out}: cannot write the export ({getattr(e, 'strerror', None) or e})") from None
    return out

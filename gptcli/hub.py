"""Downloading OpenAI's GPT-2 releases (from the Hugging Face hub or OpenAI's own storage),
verified, and converted into gptcli checkpoint directories."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gptcli import download as dl
from gptcli.checkpoint import MANIFEST, verify_checkpoint
from gptcli.config import Config
from gptcli.convert import (OpenAITensors, read_json, check_fits, config_from_openai, from_gpt2_state_dict, gpt2_config,
                            read_hf_tensors)
from gptcli.errors import InputError, RunError
from gptcli.fsio import fsync_dir
from gptcli.tensorbundle import TensorBundle
from gptcli.weights import DOWNLOADS, Imported, check_import_target, save_imported


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
        if manifest.get("pretrained") != name:  # another model, an import or a training run: not this download
            held = f"the pretrained {manifest['pretrained']}, not {name}" if manifest.get("pretrained") else \
                f"a checkpoint that is not a download of {name}"
            raise InputError(f"{out}: holds {held}; choose another directory (nothing was changed)")
        return {"checkpoint": out, "name": name, "source": manifest.get("source"), "downloaded": False}
    check_import_target(out, overwrite)  # before any download: never replace what gptcli did not write
    if endpoint is None and source == "hf" and os.environ.get("HF_ENDPOINT"):
        dl.check_base_url(os.environ["HF_ENDPOINT"], "$HF_ENDPOINT")
    elif endpoint is not None:
        dl.check_base_url(endpoint, "endpoint", "endpoint")
    cache = out / DOWNLOADS
    cfg = spec.config()
    if source == "hf":
        base = (endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
        path, facts = _download_from_hub(base, spec, revision, cache, progress)
        weights = from_gpt2_state_dict(read_hf_tensors(path.parent), cfg.model, str(path))
    else:
        base = (endpoint or OPENAI_URL).rstrip("/")
        facts = _download_from_openai(base, spec, cache, progress)
        try:  # their sizes matched; what fails now (a tensor's CRC-32C, hparams) is a bad download: never kept for reuse
            got = config_from_openai(read_json(cache / "hparams.json"), str(cache / "hparams.json"))
            if got.model.shape() != cfg.model.shape():
                raise RunError(f"{base}/{spec.params}/hparams.json: describes {got.model.shape()}, not {name}")
            weights = from_gpt2_state_dict(OpenAITensors(TensorBundle(cache / "model.ckpt")), cfg.model, str(cache))
        except (InputError, RunError) as e:
            shutil.rmtree(cache, ignore_errors=True)
            raise RunError(f"{e}; the downloaded files were removed (run again to fetch them anew)") from None
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
    size = _stated_size(headers.get("x-linked-size") or (headers.get("content-length") if status == 200 else None), url)
    pinned = f"{base}/{spec.hub_repo}/resolve/{commit or revision}/{filename}"
    dest = dl.download(pinned, cache / filename, sha256=etag, size=size, progress=_labelled(progress, filename))
    return dest, {"format": "huggingface", "repo": spec.hub_repo, "revision": commit or revision,
                  "url": pinned, "sha256": etag}


def _download_from_openai(base: str, spec: Pretrained, cache: Path, progress) -> dict:
    """Fetch OpenAI's hparams, index and data files, each checked against the server's size."""
    sizes = {}
    for filename in OPENAI_FILES:
        url = f"{base}/{spec.params}/{filename}"
        _, headers = dl.head(url)
        size = _stated_size(headers.get("content-length"), url)
        if size is None:
            raise RunError(f"{url}: the server states no size; refusing an unverifiable download")
        dl.download(url, cache / filename, size=size, progress=_labelled(progress, filename))
        sizes[filename] = size
    return {"format": "openai-tensorflow", "url": f"{base}/{spec.params}/", "bytes": sizes,
            "verified": "size, per-tensor CRC-32C"}


def _stated_size(value: str | None, url: str) -> int | None:
    """A size header in bytes (None: not stated); a value that is no number is a broken server's, refused."""
    if not value:
        return None
    if not value.strip().isdigit():
        raise RunError(f"{url}: the server stated a size that is not a number ({value!r}); refusing an unverifiable download")
    return int(value)


def _labelled(progress: FileProgress | None, label: str):
    return None if progress is None else lambda done, total: progress(label, done, total)

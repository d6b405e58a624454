"""Text -> tokens -> train/validation split -> windows -> (x, y) batches.

The book's pipeline (chapter 2 and 5): split the raw text by character at
`train_ratio`, tokenize each part, cut windows of `context_length` tokens every
`stride` tokens (the target is the window shifted by one), shuffle the training
windows each epoch and drop its last partial batch; validation keeps order and
its partial batch.

A directory written by ``gptcli prepare`` holds its own document-level split;
its windows read from memory-mapped token shards (see shards.py). With
``data.sampling: random`` training windows start at random offsets instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from gptcli.config import DataConfig
from gptcli.download import Progress, download
from gptcli.errors import InputError, RunError
from gptcli.fsio import sha256_file
from gptcli.mixture import MixtureBatchSampler, MixtureWindows, open_sources, proportions
from gptcli.sampling import GlobalBatchSampler
from gptcli.shards import INDEX, ShardTokens, is_prepared, read_document_texts, read_index
from gptcli.tokenizer import END_OF_TEXT, encode

DEFAULT_CORPUS = "data/the-verdict.txt"
VERDICT_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
)
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


def ensure_default_corpus(path: Path, progress: Progress | None = None) -> None:
    """Download the book's corpus to `path` if it is the default corpus and missing.

    Raises:
        RunError: the download failed (a runtime failure, exit 1 like every network error);
            says where to put the file or to pass --data.
    """
    if path.exists() or path.name != Path(DEFAULT_CORPUS).name:
        return
    try:
        download(VERDICT_URL, path, sha256=VERDICT_SHA256, progress=progress)
    except RunError as e:
        raise RunError(
            f"{path}: missing, and downloading it failed ({e}); "
            f"put the-verdict.txt there or pass --data PATH"
        ) from None


def not_found(path: Path | str, origin: str = "") -> str:
    """The message for a data path that does not exist, with where it came from (``origin``) and,
    for a wildcard pattern, that only ``gptcli prepare`` expands them."""
    where = f" ({origin})" if origin else ""
    glob_hint = ("; wildcards are expanded by `gptcli prepare` only: prepare the files, or name their folder"
                 if any(c in str(path) for c in "*?[") else "")
    return f"{path}: data file not found{where}{glob_hint}"


def read_corpus(path: Path, field: str = "text") -> str:
    """The text of a file or folder, its documents joined by <|endoftext|>.

    Reads what ``gptcli prepare`` reads, with the same reader (shards.read_document_texts):
    text files (also ``.txt.gz``), JSON Lines (``.jsonl``, ``.jsonl.gz``; the `field`
    of each record is a document) and folders of them, sorted, hidden entries skipped;
    a UTF-8 byte order mark is dropped.

    Raises:
        InputError: the path is missing, empty, not UTF-8, or a folder without such files.
    """
    if not path.exists():
        raise InputError(not_found(path))
    text = END_OF_TEXT.join(read_document_texts(path, field))
    if not text.strip():
        raise InputError(f"{path}: data file is empty")
    return text


def split_text(text: str, train_ratio: float) -> tuple[str, str]:
    """The book's split: the first `train_ratio` of the characters train, the rest validate."""
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]


class TokenWindows(Dataset):
    """Windows of `max_length` tokens starting every `stride` tokens; targets shifted by one.

    Window starts are ``range(0, len(tokens) - max_length, stride)``, exactly the
    book's ``GPTDatasetV1``, so the last token only ever serves as a target.
    """

    def __init__(self, tokens: torch.Tensor, max_length: int, stride: int):
        self.tokens = tokens
        self.max_length = max_length
        self.stride = stride
        self.starts = range(0, max(len(tokens) - max_length, 0), stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[i]
        chunk = self.tokens[start : start + self.max_length + 1]
        return chunk[:-1], chunk[1:]


class WindowBatchSampler(GlobalBatchSampler):
    """Batches of window indices for one epoch, shuffled or in order.

    Shuffling draws the epoch's seed from the global torch RNG exactly as
    ``RandomSampler`` does (one int64 at the epoch's first batch), then permutes
    with a private generator. That keeps the book's sequence of random draws
    (model init, then per epoch: loader seed, sampler seed, dropout) while making
    the epoch's order a single number that a checkpoint can store.

    With several processes each global batch of ``batch_size * world_size``
    windows is cut into per-rank slices (``split``), so N processes with batch b
    see the windows one process with batch N*b sees; for evaluation whole batches
    go round-robin to the ranks (``stride``).

    Random sampling (``draw_from``): an epoch still has `num_windows` windows, but
    each is an index drawn uniformly from ``range(draw_from)`` (with replacement).
    Global batch i is drawn by a generator seeded from the epoch seed and i, so
    every rank draws the same batch and a resumed epoch continues without replay.
    """

    def __init__(
        self,
        num_windows: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "split",
        draw_from: int | None = None,
    ):
        super().__init__(num_windows, batch_size, shuffle, drop_last, rank, world_size, mode)
        self.draw_from = draw_from

    def __iter__(self) -> Iterator[list[int]]:
        resume, self._resume = self._resume, None
        seed, windows_done = resume if resume else (None, 0)
        if self.shuffle and seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's draw
        generator = torch.Generator()
        order = None
        if self.shuffle and self.draw_from is None:
            generator.manual_seed(seed)
            order = torch.randperm(self.num_windows, generator=generator)
        elif not self.shuffle:
            order = torch.arange(self.num_windows)
        self.seed = seed
        gb = self.global_batch
        first = -(-windows_done // gb)
        for i in range(first, self.num_batches()):
            if self.mode == "stride" and i % self.world_size != self.rank:
                continue
            if order is None:
                size = min(gb, self.num_windows - i * gb)
                generator.manual_seed((seed + (i + 1) * 0x9E3779B97F4A7C15) % 2**64)  # golden-ratio stride between batch seeds
                batch = torch.randint(self.draw_from, (size,), generator=generator)
            else:
                batch = order[i * gb : (i + 1) * gb]
            if self.mode == "split":
                batch = batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield batch.tolist()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
    mode: str = "split",
    pin_memory: bool = False,
    sampling: str = "sliding",
) -> DataLoader:
    """A DataLoader over `dataset` driven by a `WindowBatchSampler` (no worker processes).

    With ``sampling="random"`` and `shuffle`, an epoch has as many windows as
    `dataset` (TokenWindows) but each starts at a random token offset.
    """
    if isinstance(dataset, MixtureWindows):  # data.path is a list: windows drawn by weight
        sampler = MixtureBatchSampler(dataset, batch_size, shuffle, drop_last, rank, world_size, mode)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=0, pin_memory=pin_memory)
    num_windows, draw_from = len(dataset), None
    if sampling == "random" and shuffle:
        dataset = TokenWindows(dataset.tokens, dataset.max_length, 1)  # window i starts at token i
        draw_from = len(dataset)
    sampler = WindowBatchSampler(num_windows, batch_size, shuffle, drop_last, rank, world_size, mode, draw_from)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=0, pin_memory=pin_memory)


@dataclass
class Splits:
    """Tokenized training and validation data and what they came from."""

    train: TokenWindows
    val: TokenWindows
    source: str  # the corpus path
    sha256: str  # of the corpus text (UTF-8), or of a prepared directory's index.json
    train_tokens: int
    val_tokens: int
    # A mixture (data.path is a list): (name, weight, validation windows) of each source.
    sources: tuple[tuple[str, float, TokenWindows], ...] = ()


def load_splits(cfg: DataConfig, context_length: int, path: str | None = None, progress: Progress | None = None) -> Splits:
    """Read, split and tokenize the corpus into the book's windows.

    A directory written by ``gptcli prepare`` is read from its memory-mapped
    shards instead, with the split it was prepared with (`train_ratio` unused).

    Args:
        cfg: the data section (path, train_ratio, stride).
        context_length: the window length (the book's max_length).
        path: overrides ``cfg.path``.
        progress: download progress callback, used when the default corpus is fetched.

    Raises:
        InputError: the corpus cannot be read, or a split is too short for one window.
    """
    if path is None and isinstance(cfg.path, list):
        return _load_mixture(cfg, context_length)
    corpus = Path(path or cfg.path)
    if is_prepared(corpus):
        index = read_index(corpus)
        parts = [ShardTokens(corpus, split, index) for split in ("train", "val")]
        digest = sha256_file(corpus / INDEX)
    else:
        ensure_default_corpus(corpus, progress)
        text = read_corpus(corpus)
        parts = [torch.tensor(encode(part), dtype=torch.long) for part in split_text(text, cfg.train_ratio)]
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    for name, tokens in zip(("training", "validation"), parts):
        check_split(corpus, name, len(tokens), context_length, prepared=is_prepared(corpus))
    stride = cfg.stride or context_length
    train, val = (TokenWindows(tokens, context_length, stride) for tokens in parts)
    return Splits(train, val, source=str(corpus), sha256=digest, train_tokens=len(parts[0]), val_tokens=len(parts[1]))


def _load_mixture(cfg: DataConfig, context_length: int) -> Splits:
    """The windows of each prepared source of a mixture, joined (see mixture.py)."""
    opened = open_sources(cfg.path)
    stride = cfg.stride or context_length
    names = [str(root) for root, _ in opened]
    weights = [entry["weight"] for entry in cfg.path]
    shares = proportions(weights)
    windows: dict[str, list[TokenWindows]] = {"train": [], "val": []}
    for root, index in opened:
        for split, name in (("train", "training"), ("val", "validation")):
            tokens = ShardTokens(root, split, index)
            check_split(root, name, len(tokens), context_length, prepared=True)
            windows[split].append(TokenWindows(tokens, context_length, stride))
    digest = hashlib.sha256("\n".join(f"{w} {sha256_file(root / INDEX)}" for (root, _), w in zip(opened, weights)).encode())
    return Splits(
        MixtureWindows(windows["train"], names, shares), MixtureWindows(windows["val"], names, shares),
        source="mixture(" + ", ".join(f"{n}: {w:g}" for n, w in zip(names, weights)) + ")", sha256=digest.hexdigest(),
        train_tokens=sum(len(w.tokens) for w in windows["train"]), val_tokens=sum(len(w.tokens) for w in windows["val"]),
        sources=tuple(zip(names, shares, windows["val"])),
    )


def check_split(source: Path | str, name: str, num_tokens: int, context_length: int, prepared: bool = False) -> None:
    """Raise InputError unless a split holds at least one window (context_length + 1 tokens).

    A prepared folder's split was fixed by ``gptcli prepare``: the advice is to prepare it again.
    """
    needed = context_length + 1
    if num_tokens < needed:
        fix = "use more text or a smaller context_length"
        if prepared:
            ratio = "a larger val_ratio" if name == "validation" else "a smaller val_ratio"
            fix = (f"its split was made by gptcli prepare: prepare it again with {ratio} (or, for few text files, "
                   f"split_docs=blank-lines){', or use a smaller context_length' if num_tokens else ''}")
        raise InputError(f"{source}: the {name} split has {num_tokens} tokens, one window needs {needed} "
                         f"(context_length {context_length} + 1); {fix}")

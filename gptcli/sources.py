"""Document tables for `gptcli prepare`: Parquet files and Hugging Face datasets.

A table is a sequence of rows, each row one document (its text in a string
column, `field`). `prepare` plans its pieces in input bytes, so every table
describes itself as byte offsets: ``offsets()[u]`` is where unit u starts (a
Parquet row group, a row of a saved dataset, a shard of a streamed one) and
the last entry is the table's size. A piece may only be cut at a unit's start;
``read(first, last)`` yields the texts of units [first, last) with the input
bytes each accounts for. Reading goes through record batches of `BATCH_ROWS`
rows, so memory is bounded by one batch (and one decompressed row group),
whatever the table's size.

Kinds of input:
    FILE.parquet, or a folder/glob holding them     pyarrow, one file at a time
    hf:DIR   (a folder written by save_to_disk)      datasets.load_from_disk, memory-mapped
    hf:DIR   (a folder of Parquet/JSON shards)       datasets.load_dataset(DIR, streaming=True)
    hf:NAME[:CONFIG]  (a dataset on the Hub)         datasets.load_dataset(..., streaming=True)

pyarrow and datasets are optional (``pip install 'gptcli[data]'``); without
them a Parquet or hf: input is a one-line error that says so.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from gptcli.errors import InputError

PARQUET_SUFFIXES = (".parquet",)
HF_PREFIX = "hf:"
BATCH_ROWS = 1024  # rows per record batch: bounded memory, amortised Python overhead
READ_BUFFER = 1 << 20  # Parquet is read page by page through a buffer this size, not a column chunk at once
EXTRA = "pip install 'gptcli[data]'"


def require(module: str, what: str) -> Any:
    """Import an optional dependency, or raise an InputError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"{what}: reading it needs {module}; install the data extra: {EXTRA}") from None


def is_hf(given: Path | str) -> bool:
    return str(given).startswith(HF_PREFIX)


def cut_offsets(offsets: Sequence[int], shard_bytes: int) -> list[int]:
    """Unit starts at which to cut a table into parts of at least `shard_bytes` (0 first, the size last)."""
    size = offsets[-1]
    cuts = [0]
    while cuts[-1] + shard_bytes < size:
        u = bisect.bisect_left(offsets, cuts[-1] + shard_bytes)
        if offsets[u] >= size:
            break
        cuts.append(offsets[u])
    cuts.append(size)
    return cuts


def unit_at(offsets: Sequence[int], offset: int) -> int:
    """The unit that starts at `offset` (a cut made by `cut_offsets`)."""
    return bisect.bisect_left(offsets, offset)


class _Linear(Sequence[int]):
    """Offsets of `n` equal units spread over `size` bytes (size >= n, so they strictly increase)."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, max(size, n)

    def __len__(self) -> int:
        return self.n + 1

    def __getitem__(self, u):  # type: ignore[override]
        if isinstance(u, slice):
            return [self[i] for i in range(*u.indices(len(self)))]
        if u < 0:
            u += len(self)
        if not 0 <= u <= self.n:
            raise IndexError(u)
        return u * self.size // self.n if self.n else 0


def _text_column(batch_column, label: str, field: str, row0: int) -> list[str]:
    """The texts of one record batch; a null names its row."""
    texts = batch_column.to_pylist()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f'{label}: row {row0 + i}: "{field}" is {"null" if text is None else type(text).__name__}, not a string')
    return texts


class ParquetTable:
    """One Parquet file; units are its row groups, offsets their compressed sizes on disk."""

    def __init__(self, path: Path, field: str):
        pq = require("pyarrow.parquet", str(path))
        self.path, self.label, self.field = path, str(path), field
        try:
            file = pq.ParquetFile(path)
            meta, names = file.metadata, file.schema_arrow.names
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError with its own text
            raise InputError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        if field not in names:  # a top-level column: a leaf of a struct column (meta.text) is no column to read
            nested = [p for i in range(meta.num_columns) if (p := meta.schema.column(i).path).split(".")[-1] == field]
            hint = f"; {nested[0]} is a field of a struct column, not a column" if nested else ""
            raise InputError(f'{path}: no column "{field}" (columns: {", ".join(names)}){hint}; choose one with field=NAME')
        stat = path.stat()
        self.size, self.mtime_ns, self.stamp = stat.st_size, stat.st_mtime_ns, None  # the file's own size and mtime
        self.rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        starts, pos = [], 0
        for g in range(meta.num_row_groups):
            starts.append(pos)
            rg = meta.row_group(g)
            pos += max(sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)), 1)
        # The last group runs to the end of the file, so the offsets cover every byte.
        self._offsets = [min(s, self.size - (len(starts) - i)) for i, s in enumerate(starts)] + [self.size]

    def offsets(self) -> Sequence[int]:
        return self._offsets

    def read(self, first: int, last: int) -> Iterator[tuple[str, int]]:
        pq = require("pyarrow.parquet", self.label)
        f = pq.ParquetFile(self.path, buffer_size=READ_BUFFER, pre_buffer=False)
        for g in range(first, last):
            row0 = sum(self.rows[:g])
            group_bytes = self._offsets[g + 1] - self._offsets[g]
            for batch in f.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=[self.field], use_threads=False):
                texts = _text_column(batch.column(0), self.label, self.field, row0)
                row0 += len(texts)
                for text in texts:
                    yield text, 0
            yield "", group_bytes  # progress: the group's bytes, once it is read


def folder_stamp(root: Path) -> str:
    """A fingerprint of the files below `root` (path, size and mtime of each, as `prepare` checks
    a plain file), hidden entries skipped as datasets skips them (hf download's .cache/): a rerun
    redoes the pieces of a folder whose files changed."""
    return files_stamp(root, [p for p in root.rglob("*") if p.is_file()
                              and not any(part.startswith(".") for part in p.relative_to(root).parts)])


def files_stamp(root: Path, files: Sequence[Path]) -> str:
    """A fingerprint of `files` (relative to `root`): the path, size and mtime of each."""
    h = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        stat = path.stat()
        h.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


class SavedDataset:
    """A `datasets.Dataset` written by ``save_to_disk``: memory-mapped Arrow; units are rows."""

    def __init__(self, ds, label: str, field: str):
        if field not in ds.column_names:
            raise InputError(f'{label}: no column "{field}" (columns: {", ".join(ds.column_names)}); choose one with field=NAME')
        files = [f["filename"] for f in ds.cache_files]
        self.ds, self.label, self.field = ds.select_columns([field]), label, field
        self.size = sum(os.path.getsize(f) for f in files) or len(ds)
        self.mtime_ns = max((os.stat(f).st_mtime_ns for f in files), default=0)
        self.stamp = files_stamp(Path(files[0]).parent, files) if files else None  # each file's, not only the newest
        self._offsets = _Linear(len(ds), self.size)
        self.size = self._offsets[-1]

    def offsets(self) -> Sequence[int]:
        return self._offsets

    def read(self, first: int, last: int) -> Iterator[tuple[str, int]]:
        for row0 in range(first, last, BATCH_ROWS):
            end = min(row0 + BATCH_ROWS, last)
            batch = self.ds.data.slice(row0, end - row0)  # an Arrow table view over the mapped files
            for text in _text_column(batch.column(0), self.label, self.field, row0):
                yield text, 0
            yield "", self._offsets[end] - self._offsets[row0]


class StreamedDataset:
    """A `datasets.IterableDataset` (streaming); units are its shards (usually its data files).

    Their sizes are not known before reading, so each shard counts as `shard_bytes`:
    each becomes a piece of its own, the unit that a rerun keeps or redoes. The sizes
    and mtime are therefore no fingerprint; `stamp` is (for a local folder, see
    `folder_stamp`; None for a Hub dataset, whose files are not on disk).
    """

    def __init__(self, ds, label: str, field: str, shard_bytes: int, stamp: Optional[str] = None):
        self.ds, self.label, self.field, self.stamp = ds, label, field, stamp
        self.mtime_ns = 0
        self._offsets = [u * shard_bytes for u in range(ds.num_shards + 1)]
        self.size = self._offsets[-1]

    def offsets(self) -> Sequence[int]:
        return self._offsets

    def read(self, first: int, last: int) -> Iterator[tuple[str, int]]:
        for u in range(first, last):
            shard = self.ds.shard(num_shards=self.ds.num_shards, index=u, contiguous=True)
            row = 0
            for batch in shard.iter(batch_size=BATCH_ROWS):
                if self.field not in batch:
                    raise InputError(f'{self.label}: no column "{self.field}" (columns: {", ".join(batch)}); choose one with field=NAME')
                for text in batch[self.field]:
                    if not isinstance(text, str):
                        raise InputError(f'{self.label}: shard {u} row {row}: "{self.field}" is not a string')
                    row += 1
                    yield text, 0
            yield "", self._offsets[u + 1] - self._offsets[u]


def open_hf(spec: str, split: Optional[str], field: str, shard_bytes: int):
    """The table of an ``hf:`` input: a save_to_disk folder, a local folder of shards, or a Hub name.

    Args:
        spec: ``hf:NAME[:CONFIG]`` or ``hf:DIR``.
        split: the split to read (``--split``); a save_to_disk Dataset of one split needs none.

    Raises:
        InputError: datasets is missing, the split or field is unknown, or a Hub dataset cannot be reached.
    """
    datasets = require("datasets", spec)
    name = spec[len(HF_PREFIX):]
    local = Path(name)
    if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split is None or split not in ds:
                raise InputError(f"{spec}: name a split with split=NAME ({', '.join(ds)})")
            ds = ds[split]
        elif split is not None and ds.split is None:  # no name to check it against: refuse, never ignore it
            raise InputError(f"split {split!r}: {spec} is one dataset without split names; prepare it without split=NAME",
                             param="split")
        elif split is not None and str(ds.split) != split:
            raise InputError(f"split {split!r}: {spec} holds the split {ds.split} only", param="split")
        return SavedDataset(ds, f"{spec}[{split or ds.split or 'all'}]", field)
    if split is None:
        raise InputError(f"{spec}: name the split to read with split=NAME (e.g. split=train)")
    stamp = None
    if local.is_dir():
        path, config, stamp = str(local), None, folder_stamp(local)
    else:
        path, _, config = name.partition(":")
        config = config or None
    quiet = logging.getLogger("huggingface_hub")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its retry warnings would bury the one-line error
    try:
        ds = datasets.load_dataset(path, config, split=split, streaming=True)
    except Exception as e:  # datasets and huggingface_hub raise many kinds: connection, offline, not found
        raise InputError(_hf_failure(spec, path, config, e)) from None
    finally:
        quiet.setLevel(level)
    return StreamedDataset(ds, f"{spec}[{split}]", field, shard_bytes, stamp)


def _hf_failure(spec: str, path: str, config: Optional[str], e: Exception) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    if offline or any(w in first.lower() for w in ("offline", "connect", "reach", "network", "internet")):
        return (f"{spec}: cannot reach the Hugging Face Hub ({'offline' if offline else first}); "
                f"on a machine online run `hf download --repo-type dataset {path} --local-dir DIR`, "
                f"then pass hf:DIR{'' if config is None else f' (the files of config {config})'}")
    return f"{spec}: cannot load the dataset ({first})"

"""Token shards: `gptcli prepare` writes them, training reads them memory-mapped.

Layout of a prepared directory::

    OUT/index.json              format, tokenizer, split rule, and per shard: file,
                                tokens, documents, sha256, and its boundaries file
    OUT/train-000000.bin        uint16 token ids (uint32 when the vocabulary has more than 65,536;
                                index.json "dtype"); every document is followed by <|endoftext|>
    OUT/train-000000.docs.npy   uint64 offsets (within the shard) where documents start
    OUT/val-000000.bin, ...     the same for the validation documents

Documents. A text file (``.txt``, ``.txt.gz``) is one document, unless
`split_docs` cuts it into several: at blank lines (``blank-lines``) or at lines
holding only ``<|endoftext|>`` (``endoftext``); each line of a JSON Lines file
(``.jsonl``, ``.jsonl.gz``) is one, its text in a string field (``text``); each row of a
Parquet file or a Hugging Face dataset is one, its text in the column `field`
(sources.py reads them). An <|endoftext|> written in a document is the end-of-text token,
as `tokenizer.encode` has it for train/loss/eval --data: it ends a document there (in the
.docs.npy files), inside the split of the text it was read with. A document goes to validation when the first 8 bytes of the sha256
of its UTF-8 text, read as a fraction of 2**64, fall below `val_ratio`: the split
depends on the document alone, so adding files moves no document, and identical
documents always land on the same side.

Pieces. The inputs are cut into pieces of about `shard_mb` megabytes (a big
file into several, at a line end or between words; a ``.gz`` file never); piece
k becomes the shards train-k and val-k. Each finished piece is recorded in
``OUT/.partial/`` (a folder marked as prepare's own) once its files are on disk,
so a rerun (after a crash, or with the same inputs) keeps the finished shards and
redoes the rest; the index is written last. A rerun deletes only the shards the
records of earlier runs named, and refuses a folder it cannot tell is its own. The output depends only on the inputs and options, never on
`workers` or timing, so a rerun writes identical shards (index.json differs only in its
"created" time). The token stream depends on the documents alone; how it is cut into
shards depends on the input bytes (a Parquet file and a JSON Lines file of the same
documents give the same shards only while each fits one piece).

Tokenizing in chunks, exactly. One thread reads, decodes and cuts the text;
`workers` threads tokenize (tiktoken releases the GIL). A long document is cut
at a non-space character followed by a space or newline. GPT-2's pre-tokenizer
pattern never puts a non-space character and a following space or newline in
one piece (only a piece's optional first character may be a space, and the
all-space pieces hold no other character), and it looks ahead only from
all-space pieces, so such a cut is a piece boundary: tokenizing the chunks one
by one gives the ids of tokenizing the document at once. A written <|endoftext|>
holds no space, so no cut falls inside one, and the tokenizer splits the text at
it before the pattern applies. Memory is bounded by
the chunks in flight, whatever the corpus size (a single JSON Lines record is
held whole).
"""

from __future__ import annotations

import codecs
import contextlib
import datetime as _dt
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import time
import zlib
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field as _field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np

from gptcli import sources as tables
from gptcli.errors import InputError, RunError
from gptcli.fsio import atomic_write, fsync_dir, sha256_file, sync
from gptcli.tokenizer import ALLOWED_SPECIAL, END_OF_TEXT, END_OF_TEXT_ID, get_tokenizer

if TYPE_CHECKING:
    import torch

FORMAT = "gptcli-shards"
VERSION = 1
INDEX = "index.json"
PARTIAL = ".partial"
SPLITS = ("train", "val")
# Revision of how documents are read, split and tokenized, in every piece's spec: a change
# redoes the pieces of earlier runs, whose shards a fresh run would no longer write.
# 2: a text file's split hash leaves out its byte order mark.
# 3: an <|endoftext|> written in a document is the end-of-text token, and a document boundary.
READER = 3
DTYPES = ("uint16", "uint32")  # token ids on disk; index.json says which
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
BOM = "\ufeff"  # a UTF-8 byte order mark, which some editors write first
INPUT_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + tables.PARQUET_SUFFIXES
READ_BLOCK = 1 << 20  # bytes read from a file at a time
TASK_CHARS = 1 << 18  # characters per tokenizer task: small enough to spread, big enough to amortise
SAFE_CUT = re.compile(r"\S[ \n]")  # a cut goes between the two characters (see the module docstring)
SPLIT_DOCS = ("none", "blank-lines", "endoftext")  # how a text file is cut into documents
SHARD_FILE = re.compile(r"^(train|val)-\d{6}\.(bin|docs\.npy)$")
# The temporary files prepare writes into OUT (_ShardWriter's and atomic_write's): the only .tmp-* it removes.
OWN_TEMP = re.compile(r"^\.tmp-(?:(?:train|val)-\d{6}\.(?:bin|docs\.npy)|index\.json)-\d+$")
PARTIAL_MARK = "gptcli-prepare.json"  # written first into OUT/.partial/: the folder is ours to remove
PARTIAL_MARK_TEXT = json.dumps({"format": FORMAT, "what": "pieces of an unfinished gptcli prepare"})

Progress = Callable[[int, int, int], None]  # (input bytes done, input bytes total, tokens written)


# ---------------------------------------------------------------- inputs and plan


@dataclass(frozen=True)
class Source:
    """One input file."""

    path: Path
    jsonl: bool  # JSON Lines (one document per line) or text (one document)
    gz: bool
    size: int  # bytes on disk
    mtime_ns: int
    table: Any = _field(default=None, compare=False, repr=False)  # Parquet/hf: a sources.py table, read by rows
    stamp: Optional[str] = None  # what stands for size and mtime where they are not the input's (a folder of shards)


@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of a source; a .gz source is always whole."""

    source: Source
    start: int
    end: int
    digest: Optional[str] = None  # sha256 of the document, when a text file is cut into several segments

    def spec(self) -> list:
        s = self.source
        return [str(s.path), self.start, self.end, s.size, s.mtime_ns, self.digest] + ([s.stamp] if s.stamp else [])


def find_sources(inputs: list[Path], field: str = "text", split: Optional[str] = None,
                 shard_bytes: int = 1 << 26, skipped: Optional[list[Path]] = None) -> list[Source]:
    """The input files: each file as given, the supported files below each folder and matching
    each glob (sorted), and each ``hf:`` dataset (see sources.py); hidden files and folders
    (names starting with '.': .git, editor backups, ...) below a folder are skipped.

    Args:
        skipped: if given, receives the visible files below a folder or matching a glob that are
            left out because of their suffix (``UP.TXT``, ``notes.md``), for the caller to report.

    Raises:
        InputError: an input is missing, a file cannot be read, or there is no input file at all.
    """
    paths: list[Path] = []
    found: list[Source] = []
    if split is not None and not any(tables.is_hf(g) for g in inputs):
        raise InputError(f"split {split!r}: applies to hf: inputs only", param="split")
    for given in inputs:
        if tables.is_hf(given):
            t = tables.open_hf(str(given), split, field, shard_bytes)
            found.append(Source(Path(t.label), False, False, t.size, t.mtime_ns, t, t.stamp))
        elif given.is_dir():
            paths += _supported(sorted(p for p in given.rglob("*") if p.is_file()
                                       and not any(part.startswith(".") for part in p.relative_to(given).parts)), skipped)
        elif given.exists():
            paths.append(given)
        elif glob.has_magic(str(given)) and (matches := sorted(Path(p) for p in glob.glob(str(given), recursive=True))):
            paths += _supported([p for p in matches if p.is_file()], skipped)
        else:
            raise InputError(f"{given}: input not found")
    sources, seen = found, set()
    for path in paths:
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            with open(path, "rb") as f:
                f.read(1)
            stat = path.stat()
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
        name = path.name
        table = tables.ParquetTable(path, field) if name.endswith(tables.PARQUET_SUFFIXES) else None
        sources.append(Source(path, name.endswith(JSONL_SUFFIXES), name.endswith(".gz"), stat.st_size, stat.st_mtime_ns, table))
    if not sources:
        kinds = ", ".join(INPUT_SUFFIXES)
        where = " ".join(str(p) for p in inputs) or "(none given)"
        raise InputError(f"no input files: {where} holds no {kinds} files")
    return sources


def skipped_note(skipped: list[Path]) -> str:
    """The one line saying that files below a folder or matching a glob were left out for their suffix."""
    return (f"skipped {len(skipped)} file(s) whose names end in none of {', '.join(INPUT_SUFFIXES)} "
            f"(e.g. {skipped[0]}); suffixes are case-sensitive")


def _supported(files: list[Path], skipped: Optional[list[Path]]) -> list[Path]:
    """The files with an input suffix; the others go to `skipped` (when given)."""
    if skipped is not None:
        skipped += [p for p in files if not p.name.endswith(INPUT_SUFFIXES)]
    return [p for p in files if p.name.endswith(INPUT_SUFFIXES)]


def plan_pieces(sources: list[Source], shard_bytes: int, split_docs: str = "none") -> list[list[Segment]]:
    """Group the sources, in order, into pieces of about `shard_bytes` input bytes."""
    pieces: list[list[Segment]] = []
    current: list[Segment] = []
    size = 0
    for source in sources:
        for seg in _segments(source, shard_bytes, split_docs):
            if current and size + seg.end - seg.start > shard_bytes:
                pieces.append(current)
                current, size = [], 0
            current.append(seg)
            size += seg.end - seg.start
    if current:
        pieces.append(current)
    return pieces


def _segments(source: Source, shard_bytes: int, split_docs: str = "none") -> list[Segment]:
    if source.table is not None:  # cut only where a row group / row / shard starts
        cuts = tables.cut_offsets(source.table.offsets(), shard_bytes)
        return [Segment(source, a, b) for a, b in zip(cuts, cuts[1:])]
    if source.gz or source.size <= shard_bytes:
        return [Segment(source, 0, source.size)]
    many = not source.jsonl and split_docs != "none"  # a text file of several documents
    digest = None if source.jsonl or many else _document_digest(source)
    cuts = [0]
    with open(source.path, "rb") as f:
        while cuts[-1] + shard_bytes < source.size:
            cut = _cut_between_docs(f, cuts[-1] + shard_bytes, split_docs) if many else \
                _cut_after(f, cuts[-1] + shard_bytes, source.jsonl)
            if cut >= source.size:
                break
            cuts.append(cut)
    cuts.append(source.size)
    return [Segment(source, a, b, digest) for a, b in zip(cuts, cuts[1:])]


def _cut_after(f, offset: int, jsonl: bool) -> int:
    """The first safe byte position at or after `offset`: after a newline (JSON Lines), or
    before a space/newline that follows a printable ASCII character (text, see the docstring)."""
    f.seek(offset - 1)
    pos = offset - 1
    while block := f.read(1 << 16):
        if jsonl:
            i = block.find(b"\n", 1)
            if i >= 0:
                return pos + i + 1
        else:
            for i in range(1, len(block)):
                if block[i] in b" \n" and 0x21 <= block[i - 1] <= 0x7E:
                    return pos + i
        pos += len(block) - 1
        f.seek(pos)
    return f.seek(0, io.SEEK_END)


def _is_separator(line: bytes, split_docs: str) -> bool:
    """Whether a line of a text file ends a document under `split_docs`."""
    if split_docs == "blank-lines":
        return not line.strip()
    return split_docs == "endoftext" and line.strip() == END_OF_TEXT.encode()


def _cut_between_docs(f, offset: int, split_docs: str) -> int:
    """The byte position after the first separator line that starts at or after `offset`."""
    f.seek(offset - 1)
    f.readline()  # the rest of the line `offset` falls in
    while line := f.readline():
        if _is_separator(line, split_docs):
            return f.tell()
    return f.tell()


def _open(source: Source):
    """The source's (decompressed) bytes as a binary file object."""
    try:
        return gzip.open(source.path, "rb") if source.gz else open(source.path, "rb")
    except OSError as e:
        raise InputError(f"{source.path}: cannot read ({e.strerror})") from None


def _document_digest(source: Source) -> str:
    """The sha256 of a whole text file's UTF-8 text: its bytes without a byte order mark, which is
    no text (the split of the same text as a JSON Lines record, or saved without the mark)."""
    h = hashlib.sha256()
    with _reading(source) as f:
        h.update(f.read(READ_BLOCK).removeprefix(BOM.encode("utf-8")))
        while block := f.read(READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def is_validation(digest: bytes, val_ratio: float) -> bool:
    """The split rule: the first 8 bytes of a document's sha256, as a fraction of 2**64, below `val_ratio`."""
    return int.from_bytes(digest[:8], "big") < val_ratio * 2.0**64


# ---------------------------------------------------------------- reading documents


@dataclass
class _Part:
    """A chunk of one document, in order."""

    split: str
    text: str
    starts_doc: bool
    ends_doc: bool
    nbytes: int  # input bytes consumed with this part (for progress)


def cut_text(text: str, size: Optional[int] = None) -> tuple[list[str], str]:
    """Cut `text` at safe cuts into chunks of at least `size` (TASK_CHARS) characters; return (chunks, rest)."""
    size = size or TASK_CHARS
    chunks = []
    start = 0
    while len(text) - start > size:
        m = SAFE_CUT.search(text, start + size - 1)
        if m is None:
            break
        chunks.append(text[start : m.start() + 1])
        start = m.start() + 1
    return chunks, text[start:]


@contextlib.contextmanager
def _reading(source: Source):
    """Open a source; a read error or a damaged .gz file becomes an InputError naming it."""
    try:
        with _open(source) as f:
            yield f
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{source.path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _split_of(digest: Callable[[], bytes], val_ratio: Optional[float]) -> str:
    """The split of a document (`digest` is called only when there is a split to make)."""
    return "val" if val_ratio is not None and is_validation(digest(), val_ratio) else "train"


def _text_parts(seg: Segment, val_ratio: Optional[float]) -> Iterator[_Part]:
    source = seg.source
    if source.size == 0:
        return
    split = _split_of(lambda: bytes.fromhex(seg.digest or _document_digest(source)), val_ratio)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    first, ends = seg.start == 0, seg.end == source.size
    starts = first  # the segment's first part starts a document
    pending, offset, done = "", seg.start, 0
    with _reading(source) as f:
        if not first:  # a piece cut right after a written <|endoftext|> starts a document (see _ShardWriter)
            f.seek(max(seg.start - len(END_OF_TEXT), 0))
            starts = f.read(seg.start - f.tell()) == END_OF_TEXT.encode()
        f.seek(seg.start)
        # A .gz file is one segment read to its end; offsets then count decompressed bytes.
        while source.gz or offset < seg.end:
            block = f.read(READ_BLOCK if source.gz else min(READ_BLOCK, seg.end - offset))
            if not block:
                break
            carried = len(decoder.getstate()[0])  # bytes of a character cut by the previous block, before `offset`
            try:
                pending += decoder.decode(block)
            except UnicodeDecodeError as e:  # e.start counts from the carried bytes
                raise InputError(f"{source.path}: not UTF-8 text (invalid byte at offset {offset - carried + e.start})") from None
            if offset == 0:
                pending = pending.removeprefix(BOM)  # a byte order mark is no text to train on
            offset += len(block)
            done += 0 if source.gz else len(block)
            chunks, pending = cut_text(pending)
            for chunk in chunks:
                yield _Part(split, chunk, starts, False, done)
                first = starts = False
                done = 0
    carried = len(decoder.getstate()[0])
    try:
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError:  # the file ends inside a character: name where it starts
        raise InputError(f"{source.path}: not UTF-8 text (truncated character at offset {offset - carried})") from None
    if pending or (ends and not first):
        yield _Part(split, pending, starts, ends, done)


def _jsonl_parts(seg: Segment, val_ratio: Optional[float], field: str) -> Iterator[_Part]:
    source = seg.source
    offset = seg.start
    with _reading(source) as f:
        f.seek(seg.start)
        for lineno, line in enumerate(f, 1):
            offset += len(line)
            if line.strip():
                text = _record_text(line, field, source, seg, lineno)
                yield from _document_parts(text, val_ratio, 0 if source.gz else len(line))
            if offset >= seg.end and not source.gz:
                break


def _document_parts(text: str, val_ratio: Optional[float], nbytes: int) -> Iterator[_Part]:
    """The parts of one whole document (a JSON Lines record, a table row); none when it is empty."""
    if not text:
        return
    split = _split_of(lambda: hashlib.sha256(text.encode("utf-8")).digest(), val_ratio)
    chunks, rest = cut_text(text) if len(text) > TASK_CHARS else ([], text)
    for i, chunk in enumerate(chunks):
        yield _Part(split, chunk, i == 0, False, 0)
    yield _Part(split, rest, not chunks, True, nbytes)


def _table_parts(seg: Segment, val_ratio: float) -> Iterator[_Part]:
    table = seg.source.table
    offsets = table.offsets()
    for text, nbytes in table.read(tables.unit_at(offsets, seg.start), tables.unit_at(offsets, seg.end)):
        yield from _document_parts(text, val_ratio, 0)
        if nbytes:
            yield _Part("train", "", False, False, nbytes)  # progress only: writes nothing


def _record_text(line: bytes, field: str, source: Source, seg: Segment, lineno: int) -> str:
    """The text field of one JSON Lines record; errors name the file and line."""

    def where() -> str:
        before = _count_lines(source.path, seg.start) if seg.start else 0
        return f"{source.path}:{before + lineno}"

    if seg.start == 0 and lineno == 1:
        line = line.removeprefix(BOM.encode("utf-8"))
    try:
        record = json.loads(line)
    except ValueError as e:
        raise InputError(f"{where()}: not a JSON record ({getattr(e, 'msg', e)})") from None
    if not isinstance(record, dict) or field not in record:
        raise InputError(f'{where()}: the record has no "{field}" field')
    text = record[field]
    if not isinstance(text, str):
        raise InputError(f'{where()}: "{field}" is not a string')
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a \ud800 escape: JSON allows it, UTF-8 (and the tokenizer) cannot hold it
            raise InputError(f'{where()}: "{field}" holds a lone surrogate ({text[e.start]!r} at character {e.start}), '
                             f"which is not UTF-8 text") from None
    return text


def _count_lines(path: Path, end: int) -> int:
    n = 0
    with open(path, "rb") as f:
        while end > 0 and (block := f.read(min(READ_BLOCK, end))):
            n += block.count(b"\n")
            end -= len(block)
    return n


def read_document_texts(path: Path, field: str = "text") -> list[str]:
    """The documents of a file or folder, read as `prepare` reads them (one reader for both).

    A text file (``.txt``, ``.txt.gz``, or any file named directly) is one document,
    each JSON Lines record or Parquet row another; folders are searched as `find_sources` does
    (hidden entries skipped); a leading byte order mark is dropped.

    Raises:
        InputError: a file is missing, unreadable, not UTF-8, or a record lacks `field`.
    """
    docs: list[str] = []
    for source in find_sources([path]):
        parts = _piece_parts([Segment(source, 0, source.size)], None, field)
        doc: list[str] = []
        for part in parts:
            if not part.text and not part.ends_doc:  # a table's progress-only part: no text, no document
                continue
            doc.append(part.text)
            if part.ends_doc:
                docs.append("".join(doc))
                doc = []
        if doc:
            docs.append("".join(doc))
    return docs


def _doc_parts(seg: Segment, val_ratio: Optional[float], split_docs: str) -> Iterator[_Part]:
    """The documents of a text file segment cut at separator lines (`split_docs`), each split by its hash."""
    source = seg.source
    lines: list[bytes] = []
    start = offset = seg.start

    def document() -> Iterator[_Part]:
        raw = b"".join(lines)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{source.path}: not UTF-8 text (invalid byte at offset {start + e.start})") from None
        text = (text.removeprefix(BOM) if start == 0 else text).strip("\r\n")
        if not text.strip():
            return
        split = _split_of(lambda: hashlib.sha256(text.encode("utf-8")).digest(), val_ratio)
        chunks, rest = cut_text(text) if len(text) > TASK_CHARS else ([], text)
        for i, chunk in enumerate(chunks):
            yield _Part(split, chunk, i == 0, False, 0)
        yield _Part(split, rest, not chunks, True, 0 if source.gz else len(raw))

    with _reading(source) as f:
        f.seek(seg.start)
        for line in f:
            offset += len(line)
            if _is_separator(line, split_docs):
                yield from document()
                lines, start = [], offset
            else:
                lines.append(line)
            if offset >= seg.end and not source.gz:
                break
    yield from document()


def _piece_parts(piece: list[Segment], val_ratio: Optional[float], field: str, split_docs: str = "none") -> Iterator[_Part]:
    for seg in piece:
        if seg.source.table is not None:
            yield from _table_parts(seg, val_ratio)
        elif seg.source.jsonl:
            yield from _jsonl_parts(seg, val_ratio, field)
        elif split_docs != "none":
            yield from _doc_parts(seg, val_ratio, split_docs)
        else:
            yield from _text_parts(seg, val_ratio)


def _tasks(parts: Iterator[_Part]) -> Iterator[list[_Part]]:
    """Group consecutive parts into tokenizer tasks of about TASK_CHARS characters."""
    task, chars = [], 0
    for part in parts:
        task.append(part)
        chars += len(part.text)
        if chars >= TASK_CHARS:
            yield task
            task, chars = [], 0
    if task:
        yield task


def token_dtype(vocab_size: int, what: str = "vocab_size") -> np.dtype:
    """The narrowest shard dtype that holds every id of a vocabulary: uint16, else uint32.

    Raises:
        InputError: the vocabulary does not fit uint32 either (naming `what`).
    """
    for dtype in (np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise InputError(f"{what}: its {vocab_size} token ids do not fit uint32 shards (at most {2**32})")


def _encode_task(encoding, task: list[_Part]) -> list[np.ndarray]:
    """Token ids (uint16 or uint32) of each part, <|endoftext|> appended where a document ends. Runs in a worker thread."""
    out = []
    dtype = token_dtype(encoding.n_vocab)
    for part in task:
        # tokenizer.encode's ids (a written <|endoftext|> is the token, tokenizer.ALLOWED_SPECIAL),
        # returned as a uint32 buffer instead of a list of Python ints.
        ids = encoding.encode_to_numpy(part.text, allowed_special=ALLOWED_SPECIAL) if part.text else np.empty(0, np.uint32)
        arr = np.empty(len(ids) + part.ends_doc, dtype=dtype)
        arr[: len(ids)] = ids
        if part.ends_doc:
            arr[-1] = END_OF_TEXT_ID
        out.append(arr)
    return out


# ---------------------------------------------------------------- writing shards


class _ShardWriter:
    """Appends token arrays to NAME.bin (hashing as it goes) and records document starts: where a
    part starts a document, and after every <|endoftext|> written inside one (a boundary, as the
    text reader's stream has it: `document_starts` then agrees with the .docs.npy files)."""

    def __init__(self, out: Path, name: str):
        self.out = out
        self.name = name
        self.tmp = out / f".tmp-{name}.bin-{os.getpid()}"
        self.file = None
        self.sha = hashlib.sha256()
        self.tokens = 0
        self.starts = array("Q")
        self.after_eot = False  # the last token written is an <|endoftext|> inside a document

    def write(self, arr: np.ndarray, starts_doc: bool) -> None:
        if starts_doc or (self.after_eot and len(arr)):
            self.starts.append(self.tokens)
        if not len(arr):
            return
        self.starts.extend(int(i) + 1 + self.tokens for i in np.flatnonzero(arr[:-1] == END_OF_TEXT_ID))
        self.after_eot = bool(arr[-1] == END_OF_TEXT_ID)
        if self.file is None:
            self.file = open(self.tmp, "wb")
        self.file.write(arr)
        self.sha.update(arr)
        self.tokens += len(arr)

    def finish(self) -> Optional[dict[str, Any]]:
        """Make the shard durable under its final name; its index entry, or None when empty."""
        if self.file is None:
            return None
        sync(self.file)
        self.file.close()
        os.replace(self.tmp, self.out / f"{self.name}.bin")
        docs = f"{self.name}.docs.npy"
        buf = io.BytesIO()
        np.save(buf, np.frombuffer(self.starts, dtype=np.uint64) if self.starts else np.empty(0, np.uint64))
        atomic_write(self.out / docs, buf.getvalue())
        return {
            "file": f"{self.name}.bin", "tokens": self.tokens, "documents": len(self.starts),
            "sha256": self.sha.hexdigest(), "docs_file": docs, "docs_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
        }

    def abort(self) -> None:
        try:
            if self.file is not None:
                self.file.close()  # flushes: fails again on a full disk
        except OSError:
            pass  # the failure being handled already says why
        finally:
            self.tmp.unlink(missing_ok=True)


def _entry_ok(out: Path, entry: Optional[dict[str, Any]], itemsize: int) -> bool:
    """Whether a recorded shard is on disk, whole and unchanged."""
    if entry is None:
        return True
    tokens, docs = out / entry["file"], out / entry["docs_file"]
    try:
        if tokens.stat().st_size != itemsize * entry["tokens"]:
            return False
        return sha256_file(tokens) == entry["sha256"] and sha256_file(docs) == entry["docs_sha256"]
    except OSError:
        return False


@dataclass
class PrepareResult:
    out: Path
    index: dict[str, Any]
    pieces_done: int  # pieces tokenized in this run
    pieces_kept: int  # finished pieces of an earlier run, kept
    elapsed_s: float
    tokens_done: int = 0  # tokens written in this run (not those of kept pieces): the run's rate
    skipped: list[Path] = _field(default_factory=list)  # files in a folder or glob left out for their suffix


def prepare(
    inputs: list[Path],
    out: Path,
    *,
    workers: Optional[int] = None,
    val_ratio: float = 0.01,
    shard_mb: float = 64,
    field: str = "text",
    split_docs: str = "none",
    split: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> PrepareResult:
    """Tokenize text files, folders, .txt.gz, JSON Lines, Parquet and Hugging Face datasets into
    token shards under `out` (uint16, or uint32 for a vocabulary beyond 65,536 ids).

    Args:
        inputs: files, folders (searched for .txt, .txt.gz, .jsonl, .jsonl.gz, .parquet), globs,
            and ``hf:NAME[:CONFIG]`` / ``hf:DIR`` datasets (see sources.py).
        out: the output directory: new, empty, or an earlier run's output (known by its index's
            format and its marked .partial/), whose finished shards are kept. A run that fails
            removes `out` if it created it.
        workers: tokenizer threads (default: the CPU count).
        val_ratio: the fraction of documents, by hash, that go to validation.
        shard_mb: input megabytes per piece (one train and one val shard each).
        field: the text field of JSON Lines records, the text column of Parquet files and datasets.
        split_docs: cut each text file into documents at blank lines ("blank-lines") or at
            lines holding only <|endoftext|> ("endoftext"); "none": a text file is one document.
        split: the split of ``hf:`` inputs.
        progress: called with (input bytes done, input bytes total, tokens written).

    Raises:
        InputError: bad inputs (named, with the line for JSON Lines), an output directory
            that is not ours (nothing in it is touched), or a tokenizer whose vocabulary does not fit uint32.
        RunError: the output cannot be written.
    """
    t0 = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    if not 0.0 <= val_ratio < 1.0:
        raise InputError(f"val_ratio: must be in [0, 1), got {val_ratio}", param="val_ratio")
    if shard_mb <= 0 or workers < 1:
        raise InputError(f"{'shard_mb' if shard_mb <= 0 else 'workers'}: must be positive",
                         param="shard_mb" if shard_mb <= 0 else "workers")
    if split_docs not in SPLIT_DOCS:
        raise InputError(f"split_docs: one of {', '.join(SPLIT_DOCS)}, got {split_docs!r}", param="split_docs")
    encoding = get_tokenizer()
    token_dtype(encoding.n_vocab, f"tokenizer {encoding.name}")
    shard_bytes = max(int(shard_mb * 1e6), 1)
    skipped: list[Path] = []
    sources = find_sources(inputs, field, split, shard_bytes, skipped)
    _check_applies(sources, field, split_docs)
    _check_out(out)
    pieces = plan_pieces(sources, shard_bytes, split_docs)
    options = {"val_ratio": val_ratio, "field": field, "tokenizer": encoding.name, "vocab_size": encoding.n_vocab,
               "version": VERSION, "reader": READER, **({"split_docs": split_docs} if split_docs != "none" else {})}
    created = not out.exists()
    try:
        _open_partial(out)
        for p in out.iterdir():  # files a killed run was writing (ours by name; nothing else)
            if OWN_TEMP.match(p.name):
                p.unlink()
    except OSError as e:
        raise RunError(f"{out}: cannot write ({e.strerror})") from None
    try:
        result = _prepare_into(out, sources, pieces, options, encoding, workers, progress, t0)
        result.skipped = skipped
        return result
    except Exception as e:
        if created:  # bad input or a failure part-way: leave no half-made output folder behind
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a failing device: a runtime failure, not a bug
            raise RunError(f"{e.filename or out}: {e.strerror or e}"
                           f"{'' if created else '; the finished shards are kept: run the command again'}") from None
        raise


def _prepare_into(out, sources, pieces, options, encoding, workers, progress, t0) -> PrepareResult:
    earlier = _earlier_records(out)
    total = sum(s.size for s in sources)
    done = {"bytes": 0, "tokens": 0}

    def advance(nbytes: int, ntokens: int) -> None:
        done["bytes"] += nbytes
        done["tokens"] += ntokens
        if progress is not None:
            progress(done["bytes"], total, done["tokens"])

    records, tokenized, tokens_done = [], 0, 0
    itemsize = token_dtype(options["vocab_size"]).itemsize
    with ThreadPoolExecutor(workers, thread_name_prefix="gptcli-tokenize") as pool:
        for k, piece in enumerate(pieces):
            spec = {"segments": [seg.spec() for seg in piece], **options}
            record = earlier.get(k)
            piece_bytes, bytes_before = sum(seg.end - seg.start for seg in piece), done["bytes"]
            if record is None or record["spec"] != spec or not all(_entry_ok(out, record[s], itemsize) for s in SPLITS):
                record = {"piece": k, "spec": spec, **_tokenize_piece(piece, k, out, pool, workers, encoding, options, advance)}
                atomic_write(out / PARTIAL / f"piece-{k:06d}.json", json.dumps(record))
                tokenized += 1
                tokens_done += sum(record[s]["tokens"] for s in SPLITS if record[s])
            else:
                advance(0, sum(record[s]["tokens"] for s in SPLITS if record[s]))
            records.append(record)
            advance(bytes_before + piece_bytes - done["bytes"], 0)  # exact, whatever the parts reported
    earlier_files = {r[s][key] for r in earlier.values() for s in SPLITS if r.get(s) for key in ("file", "docs_file")}
    index = _write_index(out, sources, records, options, earlier_files)
    return PrepareResult(out, index, tokenized, len(pieces) - tokenized, time.perf_counter() - t0, tokens_done)


def _check_applies(sources: list[Source], field: str, split_docs: str) -> None:
    """Refuse `field` and `split_docs` where no input is of the kind they apply to (never drop one silently)."""
    if field != "text" and all(not s.jsonl and s.table is None for s in sources):
        raise InputError(f"field {field!r}: names the text of JSON Lines records, Parquet and dataset columns; "
                         f"the inputs are text files only (each is its own text)", param="field")
    if split_docs != "none" and all(s.jsonl or s.table is not None for s in sources):
        raise InputError(f"split_docs {split_docs!r}: cuts text files into documents; the inputs hold no text files "
                         f"(a JSON Lines record or a table row is already one document)", param="split_docs")


def _check_out(out: Path) -> None:
    """Refuse an output path that is a file, or a non-empty directory `prepare` did not write.

    A directory is ours only by content: an index.json of our format, and a .partial/ folder
    holding our marker file (an empty one counts as nothing: a run killed before marking it).
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"out {out}: exists and is not a directory", param="out")
    if not out.is_dir():
        return
    index, partial = out / INDEX, out / PARTIAL
    entries = [p for p in out.iterdir() if not (p == partial and p.is_dir() and not any(p.iterdir()))]
    if not entries:
        return
    if index.exists() and not _is_own_index(index):
        raise InputError(f'out {out}: its {INDEX} is not a gptcli shard index (no "format": "{FORMAT}"); '
                         f"prepare overwrites only its own output: choose another output directory", param="out")
    if partial in entries and not _is_own_partial(partial):
        raise InputError(f"out {out}: its {PARTIAL}/ folder was not written by gptcli prepare (no {PARTIAL}/{PARTIAL_MARK}); "
                         f"choose another output directory", param="out")
    if not index.exists() and partial not in entries:
        raise InputError(f"out {out}: exists and was not written by gptcli prepare (no {INDEX}); choose another output directory",
                         param="out")


def _is_own_index(path: Path) -> bool:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("format") == FORMAT


def _is_own_partial(partial: Path) -> bool:
    try:
        return partial.is_dir() and (partial / PARTIAL_MARK).read_text(encoding="utf-8") == PARTIAL_MARK_TEXT
    except (OSError, ValueError):
        return False


def _open_partial(out: Path) -> None:
    """Create OUT/.partial/ (and OUT) marked as ours, unless it is already."""
    partial = out / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    if not (partial / PARTIAL_MARK).is_file():
        atomic_write(partial / PARTIAL_MARK, PARTIAL_MARK_TEXT)


def _earlier_records(out: Path) -> dict[int, dict[str, Any]]:
    """Piece records of earlier runs into `out`: from its index, then from .partial/ (newer)."""
    records: dict[int, dict[str, Any]] = {}
    try:
        index = json.loads((out / INDEX).read_text(encoding="utf-8"))
        records.update({r["piece"]: r for r in index.get("pieces", [])})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    for path in sorted((out / PARTIAL).glob("piece-*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            records[record["piece"]] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a torn record (cannot happen with atomic writes, but costs nothing to survive)
    return records


def _tokenize_piece(piece, k, out, pool, workers, encoding, options, advance) -> dict[str, Any]:
    """Tokenize one piece into train-k/val-k; return their index entries (None for an empty split)."""
    writers = {s: _ShardWriter(out, f"{s}-{k:06d}") for s in SPLITS}
    pending: deque = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            task, future = pending.popleft()
            for part, arr in zip(task, future.result()):
                writers[part.split].write(arr, part.starts_doc)
            advance(sum(part.nbytes for part in task), sum(len(arr) for arr in future.result()))

    try:
        for task in _tasks(_piece_parts(piece, options["val_ratio"], options["field"], options.get("split_docs", "none"))):
            pending.append((task, pool.submit(_encode_task, encoding, task)))
            drain(2 * workers)  # bounded: at most 2 tasks per worker in flight
        drain(0)
        entries = {s: w.finish() for s, w in writers.items()}
        fsync_dir(out)  # the renames are durable before the piece is recorded as finished
        return entries
    except BaseException:
        for _, future in pending:
            future.cancel()
        for w in writers.values():
            w.abort()
        raise


def _write_index(out: Path, sources: list[Source], records: list[dict[str, Any]], options: dict[str, Any],
                 earlier_files: set[str]) -> dict[str, Any]:
    """Write index.json (atomically, last), then drop the shards of earlier runs that no record names
    any more (`earlier_files`: what their records named; no other file) and the .partial records."""
    splits = {}
    for s in SPLITS:
        shards = [r[s] for r in records if r[s]]
        splits[s] = {"tokens": sum(e["tokens"] for e in shards), "documents": sum(e["documents"] for e in shards),
                     "shards": shards}
    index = {
        "format": FORMAT,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": options["tokenizer"],
        "vocab_size": options["vocab_size"],
        "eot_id": END_OF_TEXT_ID,
        "dtype": token_dtype(options["vocab_size"]).name,
        "split_rule": "sha256(document UTF-8)[:8] / 2**64 < val_ratio -> val",
        "val_ratio": options["val_ratio"],
        "field": options["field"],
        "split_docs": options.get("split_docs", "none"),
        "sources": {"files": len(sources), "bytes": sum(x.size for x in sources),
                    "text_files": sum(1 for x in sources if not x.jsonl and x.table is None)},
        "splits": splits,
        "pieces": [{"piece": r["piece"], "spec": r["spec"], "train": r["train"], "val": r["val"]} for r in records],
    }
    try:
        atomic_write(out / INDEX, json.dumps(index, indent=1))
        named = {r[s][key] for r in records for s in SPLITS if r[s] for key in ("file", "docs_file")}
        for name in earlier_files - named:
            if SHARD_FILE.match(name):
                (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / PARTIAL, ignore_errors=True)
        fsync_dir(out)
    except OSError as e:
        raise RunError(f"{out}: cannot write the index ({e.strerror})") from None
    return index


def empty_split_warnings(index: dict[str, Any]) -> list[str]:
    """A warning for each split of a prepared index that holds no token, with advice that can help.

    With few documents and text files not cut into documents, the advice is `split_docs`:
    no `val_ratio` can split one document (only for text inputs: `split_docs` cuts nothing else).
    """
    splits, ratio = index["splits"], index["val_ratio"]
    documents = splits["train"]["documents"] + splits["val"]["documents"]
    if documents == 0:
        return ["no documents at all: the inputs hold no text"]
    text_files = index["sources"].get("text_files", 1)  # an index older than the count: assume text
    if documents < 10 and index.get("split_docs", "none") == "none" and text_files:
        advice = (f"there are only {documents} document(s) (a text file is one document); cut text files into "
                  f"documents with split_docs=blank-lines (or endoftext), or add documents")
    else:
        advice = {"val": f"raise `val_ratio` (now {ratio}) or add documents",
                  "train": f"lower `val_ratio` (now {ratio}) or add documents"}
    warnings = []
    for split, name in (("train", "training"), ("val", "validation")):
        if splits[split]["tokens"] == 0:
            tip = advice if isinstance(advice, str) else advice[split]
            warnings.append(f"the {name} split is empty (all {documents} document(s) went to the other); {tip}")
    return warnings


# ---------------------------------------------------------------- reading shards


def is_prepared(path: Path) -> bool:
    """Whether `path` is a directory written by `gptcli prepare`."""
    return path.is_dir() and (path / INDEX).is_file()


def read_index(root: Path) -> dict[str, Any]:
    """The index of a prepared directory, checked for format and dtype.

    Raises:
        InputError: the index is unreadable, of another format, or incomplete.
    """
    path = root / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the shard index ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("dtype") not in DTYPES:
        raise InputError(f"{path}: not a gptcli shard index (format {FORMAT}, dtype {' or '.join(DTYPES)})")
    if index.get("version") != VERSION:
        raise InputError(f"{path}: shard format version {index.get('version')}, this gptcli reads {VERSION}; rerun gptcli prepare")
    return index


class ShardTokens:
    """One split of a prepared directory as a single token sequence, read from memory-mapped shards.

    ``len()`` is the number of tokens; slicing returns an int64 tensor (windows
    may span two shards). The maps are dropped after every `REMAP_BYTES` read:
    pages of a file mapping count towards the resident memory of the process
    until unmapped, so reading a corpus larger than RAM would otherwise look like
    growing memory (nanoGPT recreates its memmap per batch for the same reason).
    A read counts as at least `PAGES_PER_READ` bytes: a page fault maps the pages
    around it, a whole large folio of the page cache on recent Linux (up to 2 MiB).
    """

    REMAP_BYTES = 256 << 20
    PAGES_PER_READ = 2 << 20

    def __init__(self, root: Path, split: str, index: dict[str, Any]):
        self.root = root
        self.split = split
        shards = index["splits"][split]["shards"]
        self.paths = [root / e["file"] for e in shards]
        self.dtype = np.dtype(index["dtype"])
        self.offsets = np.cumsum([0] + [e["tokens"] for e in shards])
        for path, e in zip(self.paths, shards):
            try:
                size = path.stat().st_size
            except OSError:
                raise InputError(f"{path}: shard missing; rerun gptcli prepare") from None
            if size != self.dtype.itemsize * e["tokens"]:
                raise InputError(f"{path}: {size} bytes, the index says {self.dtype.itemsize * e['tokens']}; rerun gptcli prepare")
        self._maps: dict[int, np.memmap] = {}
        self._read = 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> "torch.Tensor":
        import torch  # here, not at the top: `gptcli prepare` never needs torch (1.5 s and 120 MB saved)

        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("ShardTokens supports contiguous slices only")
        parts = []
        pos = start
        while pos < stop:
            i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            lo, hi = pos - self.offsets[i], min(stop, self.offsets[i + 1]) - self.offsets[i]
            parts.append(self._map(i)[lo:hi])
            pos = int(self.offsets[i] + hi)
        out = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, self.dtype)  # [] for an empty document
        self._read += max(self.dtype.itemsize * (stop - start), self.PAGES_PER_READ)
        result = torch.from_numpy(np.array(out, dtype=np.int64))
        if self._read > self.REMAP_BYTES:
            self._maps.clear()
            self._read = 0
        return result

    def _map(self, i: int) -> np.memmap:
        m = self._maps.get(i)
        if m is None:
            m = self._maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r")
        return m


def read_documents(root: Path, split: str) -> Iterator[np.ndarray]:
    """The token ids of each document of a split, in order, without its <|endoftext|>."""
    index = read_index(root)
    tokens = ShardTokens(root, split, index)
    starts = []
    for offset, e in zip(tokens.offsets, index["splits"][split]["shards"]):
        starts += [int(offset) + int(x) for x in np.load(root / e["docs_file"])]
    for a, b in zip(starts, starts[1:] + [len(tokens)]):
        yield tokens[a : b - 1].numpy()

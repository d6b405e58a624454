"""Read TensorFlow checkpoints (TensorBundle: ``NAME.index`` + ``NAME.data-*``) without TensorFlow.

OpenAI published GPT-2 as TensorFlow checkpoints; the book reads them with
``tf.train.load_variable``, which makes TensorFlow a dependency. The format is
small enough to read directly:

- ``NAME.index`` is a LevelDB-style table (SSTable): key-sorted blocks of
  prefix-compressed entries, an index block pointing at them and a 48-byte footer
  (two block handles and a magic number). Each block is followed by a type byte
  (0 = uncompressed) and a masked CRC-32C. Key "" holds a ``BundleHeaderProto``
  (number of shards, endianness); every other key is a tensor name whose value is
  a ``BundleEntryProto`` (dtype, shape, shard, offset, size, CRC-32C).
- ``NAME.data-SSSSS-of-NNNNN`` hold the raw little-endian tensor bytes.

References: leveldb/doc/table_format.md; tensorflow/core/protobuf/tensor_bundle.proto
and tensorflow/core/util/tensor_bundle/tensor_bundle.cc. The few protobuf fields
needed are decoded by hand (protobuf's wire format: varint keys, field number << 3
| wire type). Every block checksum and every tensor's CRC-32C is verified: OpenAI
publishes no hash for these files, so the checksums TensorFlow wrote are the only
guard against a corrupted download.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptcli.errors import RunError

TABLE_MAGIC = 0xDB4775248B80FB57  # leveldb's kTableMagicNumber
FOOTER_BYTES = 48  # two BlockHandles padded to 2 * 20 bytes, then the 8-byte magic
# tensorflow/core/framework/types.proto DataType values we can read.
DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 9: torch.int64, 14: torch.bfloat16, 19: torch.float16}


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives: BundleEntryProto's fields."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored


class TensorBundle(Mapping):
    """The tensors of a TensorFlow checkpoint, read on access.

    Args:
        prefix: the checkpoint prefix, e.g. ``models/124M/model.ckpt`` (the files
            are ``prefix.index`` and ``prefix.data-00000-of-00001``).

    Raises:
        RunError: a missing, truncated or corrupted file, or a feature this reader
            does not support (compressed blocks, partitioned or big-endian tensors).
    """

    def __init__(self, prefix: Path):
        self.prefix = Path(prefix)
        index = Path(f"{prefix}.index")
        try:
            data = index.read_bytes()
        except OSError as e:
            raise RunError(f"{index}: cannot read ({e.strerror})") from None
        num_shards, self.entries = _parse_index(data, index)
        self.shards = [Path(f"{prefix}.data-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]
        missing = [p.name for p in self.shards if not p.is_file()]
        if missing:
            raise RunError(f"{self.prefix}: missing data file {', '.join(missing)}")

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        dtype = DTYPES[entry.dtype]
        shard = self.shards[entry.shard_id]
        expected = int(np.prod(entry.shape, dtype=np.int64)) * dtype.itemsize
        if entry.size != expected:
            raise RunError(f"{self.prefix}.index: {name}: {entry.size} bytes for shape {list(entry.shape)}")
        with open(shard, "rb") as f:
            f.seek(entry.offset)
            raw = np.fromfile(f, dtype=np.uint8, count=entry.size)
        if raw.size != entry.size:
            raise RunError(f"{shard}: truncated ({name} needs bytes {entry.offset}..{entry.offset + entry.size})")
        if crc32c(raw) != unmask_crc(entry.crc32c):
            raise RunError(f"{shard}: {name}: CRC-32C mismatch (corrupted file; download it again)")
        return torch.from_numpy(raw).view(dtype).reshape(entry.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _parse_index(data: bytes, where: Path) -> tuple[int, dict[str, BundleEntry]]:
    """(number of data shards, entries by tensor name) from the bytes of an .index file."""
    if len(data) < FOOTER_BYTES:
        raise RunError(f"{where}: truncated ({len(data)} bytes; not a TensorFlow checkpoint index)")
    (magic,) = struct.unpack("<Q", data[-8:])
    if magic != TABLE_MAGIC:
        raise RunError(f"{where}: not a TensorFlow checkpoint index (bad magic number)")
    footer = data[-FOOTER_BYTES:]
    _meta_offset, pos = _varint(footer, 0)  # the metaindex block is empty in bundles
    _meta_size, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    num_shards, entries = None, {}
    for _, handle in _block_entries(_read_block(data, index_offset, index_size, where), where):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        for key, value in _block_entries(_read_block(data, offset, size, where), where):
            if key == b"":
                num_shards = _parse_header(value, where)
            else:
                name = key.decode("utf-8")
                entries[name] = _parse_entry(value, name, where)
    if num_shards is None:
        raise RunError(f"{where}: no bundle header (not a TensorBundle index)")
    return num_shards, entries


def _read_block(data: bytes, offset: int, size: int, where: Path) -> bytes:
    """A block's contents, after checking its trailer (type byte + masked CRC-32C)."""
    end = offset + size
    if end + 5 > len(data) - FOOTER_BYTES:
        raise RunError(f"{where}: block at byte {offset} runs past the end of the file (truncated?)")
    block, kind = data[offset:end], data[end]
    (stored,) = struct.unpack("<I", data[end + 1:end + 5])
    if crc32c(np.frombuffer(data[offset:end + 1], dtype=np.uint8)) != unmask_crc(stored):
        raise RunError(f"{where}: block at byte {offset}: checksum mismatch (corrupted file)")
    if kind != 0:
        raise RunError(f"{where}: compressed blocks (type {kind}) are not supported")
    return block


def _block_entries(block: bytes, where: Path) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs of a table block; keys share prefixes with their predecessor."""
    if len(block) < 4:
        raise RunError(f"{where}: malformed table block")
    (num_restarts,) = struct.unpack("<I", block[-4:])
    limit = len(block) - 4 - 4 * num_restarts
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise RunError(f"{where}: malformed table block")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_len]
        pos += value_len


def _parse_header(msg: bytes, where: Path) -> int:
    """BundleHeaderProto: num_shards = 1 (int32), endianness = 2 (0 little, 1 big)."""
    num_shards, endianness = 1, 0
    for field, value in _fields(msg, where):
        if field == 1:
            num_shards = value
        elif field == 2:
            endianness = value
    if endianness != 0:
        raise RunError(f"{where}: big-endian checkpoints are not supported")
    return num_shards


def _parse_entry(msg: bytes, name: str, where: Path) -> BundleEntry:
    """BundleEntryProto: dtype 1, shape 2 (TensorShapeProto), shard_id 3, offset 4, size 5,
    crc32c 6 (fixed32), slices 7 (partitioned variables, unsupported)."""
    values = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": 0}
    for field, value in _fields(msg, where):
        if field == 1:
            values["dtype"] = value
        elif field == 2:
            values["shape"] = _parse_shape(value, where)
        elif field in (3, 4, 5, 6):
            values[("shard_id", "offset", "size", "crc32c")[field - 3]] = value
        elif field == 7:
            raise RunError(f"{where}: {name} is a partitioned variable (slices are not supported)")
    if values["dtype"] not in DTYPES:
        raise RunError(f"{where}: {name} has TensorFlow dtype {values['dtype']}, which this reader does not support")
    return BundleEntry(**values)


def _parse_shape(msg: bytes, where: Path) -> tuple[int, ...]:
    """TensorShapeProto: repeated dim = 2, each Dim {size = 1 (int64), name = 2}."""
    dims = []
    for field, dim in _fields(msg, where):
        if field == 2:
            size = 0
            for f, v in _fields(dim, where):
                if f == 1:
                    size = v
            dims.append(size)
    return tuple(dims)


def _fields(msg: bytes, where: Path) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: ints for varint/fixed, bytes for length-delimited."""
    pos = 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(msg, pos)
        elif wire == 1:
            (value,), pos = struct.unpack_from("<Q", msg, pos), pos + 8
        elif wire == 2:
            length, pos = _varint(msg, pos)
            value, pos = msg[pos:pos + length], pos + length
        elif wire == 5:
            (value,), pos = struct.unpack_from("<I", msg, pos), pos + 4
        else:
            raise RunError(f"{where}: malformed protobuf (wire type {wire})")
        if pos > len(msg):
            raise RunError(f"{where}: malformed protobuf (truncated field {field})")
        yield field, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise RunError("malformed TensorFlow checkpoint index (truncated varint)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


# ---------------------------------------------------------------- CRC-32C (Castagnoli)

_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _bit_steps(reg: np.ndarray, n: int) -> np.ndarray:
    """Advance CRC registers by `n` zero bits."""
    for _ in range(n):
        reg = np.where(reg & 1, (reg >> 1) ^ np.uint32(_POLY), reg >> 1).astype(np.uint32)
    return reg


# reg' = _T16[(reg ^ w) & 0xFFFF] ^ (reg >> 16) feeds one little-endian 16-bit word w.
_T16 = _bit_steps(np.arange(1 << 16, dtype=np.uint32), 16)


def crc32c(data: np.ndarray) -> int:
    """CRC-32C of a uint8 array, vectorised with numpy (no compiled extension needed).

    The CRC is sequential, so the buffer is cut into R rows of L bytes whose CRCs
    (register starting at 0) run side by side, one numpy step per 16-bit column;
    the row CRCs are then chained with the linear map "advance the register over
    L bytes". The initial register 0xFFFFFFFF is folded into the first four bytes
    (for a reflected CRC, starting from c equals starting from 0 with c XORed into
    the first four message bytes), and the front is padded with zero bytes, which
    leave a zero register unchanged. L ~ sqrt(n) balances numpy steps against
    Python-level chaining.
    """
    n = int(data.size)
    if n < 4:
        return _crc32c_bytes(data.tobytes())
    row = max(64, 1 << (max(n // 16, 1).bit_length() // 2 + 1))  # bytes per row, even
    rows = -(-n // row)
    buf = np.zeros(rows * row, dtype=np.uint8)
    pad = rows * row - n
    buf[pad:] = data
    buf[pad:pad + 4] ^= 0xFF
    words = buf.view("<u2").reshape(rows, row // 2).T.copy()  # column j: word j of every row
    reg = np.zeros(rows, dtype=np.uint32)
    for w in words:
        reg = _T16[(reg ^ w) & 0xFFFF] ^ (reg >> 16)
    t0, t1, t2, t3 = _advance_tables(row)
    state = 0
    for r in reg.tolist():
        state = t0[state & 0xFF] ^ t1[(state >> 8) & 0xFF] ^ t2[(state >> 16) & 0xFF] ^ t3[state >> 24] ^ r
    return state ^ 0xFFFFFFFF


def _crc32c_bytes(data: bytes) -> int:
    """Bit by bit, for the few bytes too short to fold the initial register into."""
    reg = 0xFFFFFFFF
    for b in data:
        reg ^= b
        for _ in range(8):
            reg = (reg >> 1) ^ _POLY if reg & 1 else reg >> 1
    return reg ^ 0xFFFFFFFF


@functools.lru_cache(maxsize=32)
def _advance_tables(nbytes: int) -> tuple[list[int], ...]:
    """The linear map "feed `nbytes` zero bytes" as four byte-indexed lookup tables."""
    images = np.uint32(1) << np.arange(32, dtype=np.uint32)
    for _ in range(nbytes // 2):
        images = _T16[images & 0xFFFF] ^ (images >> 16)
    images = images.tolist()
    tables = []
    for byte in range(4):
        t = [0] * 256
        for v in range(1, 256):
            low = v & -v
            t[v] = t[v ^ low] ^ images[8 * byte + low.bit_length() - 1]
        tables.append(t)
    return tuple(tables)


def unmask_crc(masked: int) -> int:
    """LevelDB/TensorFlow store CRCs masked (rotated and offset) so CRCs of CRCs stay strong."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF

"""The TensorFlow checkpoint reader, against checkpoints written by TensorFlow itself
(tests/fixtures/make_openai_checkpoint.py made them; TensorFlow is not needed here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gptcli.errors import RunError
from gptcli.tensorbundle import TensorBundle, crc32c

from conftest import FIXTURES



@pytest.mark.parametrize("name", ["openai-tiny", "tf-many"])
def test_reads_exactly_what_tensorflow_wrote(name):
    bundle = TensorBundle(FIXTURES / name / "model.ckpt")
    expected = np.load(FIXTURES / name / "expected.npz")
    assert sorted(bundle) == sorted(k.replace(".", "/") for k in expected.files)
    for key in bundle:
        want = torch.from_numpy(expected[key.replace("/", ".")])
        got = bundle[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(got, want), key


def _bitwise_crc32c(data: bytes) -> int:
    reg = 0xFFFFFFFF
    for b in data:
        reg ^= b
        for _ in range(8):
            reg = (reg >> 1) ^ 0x82F63B78 if reg & 1 else reg >> 1
    return reg ^ 0xFFFFFFFF


def test_crc32c_matches_the_definition():
    assert crc32c(np.frombuffer(b"123456789", dtype=np.uint8)) == 0xE3069283  # RFC 3720's check value
    rng = np.random.default_rng(0)
    for n in (0, 1, 3, 4, 5, 64, 65, 1000, 4099, 70001):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert crc32c(data) == _bitwise_crc32c(data.tobytes()), n


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "openai-tiny", dst)
    return dst


def test_a_flipped_data_byte_is_caught(tmp_path):
    d = _copy(tmp_path)
    data = d / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0x01  # inside the last tensor written
    data.write_bytes(bytes(raw))
    bundle = TensorBundle(d / "model.ckpt")
    with pytest.raises(RunError, match="CRC-32C mismatch"):
        for key in bundle:
            bundle[key]


def test_truncated_or_missing_files_are_one_line_errors(tmp_path):
    d = _copy(tmp_path)
    index = d / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-100])
    with pytest.raises(RunError, match="not a TensorFlow checkpoint index|truncated"):
        TensorBundle(d / "model.ckpt")
    d = _copy(tmp_path / "b")
    (d / "model.ckpt.data-00000-of-00001").unlink()
    with pytest.raises(RunError, match="missing data file"):
        TensorBundle(d / "model.ckpt")
    d = _copy(tmp_path / "c")
    index = d / "model.ckpt.index"
    raw = bytearray(index.read_bytes())
    raw[20] ^= 0x01  # inside the first data block
    index.write_bytes(bytes(raw))
    with pytest.raises(RunError, match="checksum mismatch"):
        TensorBundle(d / "model.ckpt")
    d = _copy(tmp_path / "d")
    data = d / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-10])
    bundle = TensorBundle(d / "model.ckpt")
    with pytest.raises(RunError, match="truncated"):
        for key in bundle:
            bundle[key]

"""gptcli prepare on Parquet files and Hugging Face datasets (issue 16), and uint32 shards."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from gptcli import shards
from gptcli.shards import prepare, read_documents
from gptcli.tokenizer import get_tokenizer

from test_shards import _documents_of, _one_line_error, _text

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _documents(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [_text(rng, rng.randint(1, 300)) + f" {i}" for i in range(n)]
    docs[7] = _text(rng, 5000)  # longer than a tokenizer task: cut into chunks
    return docs


def _write_parquet(path: Path, docs: list, row_group_size: int = 7, field: str = "text") -> Path:
    table = pa.table({"id": list(range(len(docs))), field: docs})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "index.json"}


def _splits(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())["splits"]


def test_parquet_jsonl_and_text_holding_the_same_documents_give_byte_identical_shards(tmp_path):
    """issue 16 acceptance: the three formats agree byte for byte."""
    docs = _documents()
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    _write_parquet(tmp_path / "docs.parquet", docs)
    outs = {}
    for name, given in (("txt", tmp_path / "txt"), ("jsonl", tmp_path / "docs.jsonl"), ("parquet", tmp_path / "docs.parquet")):
        prepare([given], tmp_path / f"out-{name}", workers=2, val_ratio=0.2)
        outs[name] = tmp_path / f"out-{name}"
    reference = _shard_bytes(outs["txt"])
    assert {"train-000000.bin", "val-000000.bin"} <= set(reference)
    for name in ("jsonl", "parquet"):
        assert _shard_bytes(outs[name]) == reference, name
        assert _splits(outs[name]) == _splits(outs["txt"]), name
    got = [d.tolist() for s in ("train", "val") for d in read_documents(outs["parquet"], s)]
    assert sorted(got) == sorted(ids for d in docs for ids in _documents_of(d))


def test_train_loss_and_eval_read_a_parquet_file_as_the_jsonl_of_its_documents(tmp_path):
    """The readers of train, loss and eval --data (read_corpus) gave a Parquet file one extra <|endoftext|> at its end
    (per file in a folder): another token stream, corpus sha256 and loss than its documents as JSON Lines."""
    from gptcli.data import read_corpus

    docs = _documents(20)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (tmp_path / "pq").mkdir()
    _write_parquet(tmp_path / "pq" / "a.parquet", docs[:10])
    _write_parquet(tmp_path / "pq" / "b.parquet", docs[10:])
    assert read_corpus(tmp_path / "pq" / "a.parquet") == "<|endoftext|>".join(docs[:10])
    assert read_corpus(tmp_path / "pq") == read_corpus(tmp_path / "docs.jsonl") == "<|endoftext|>".join(docs)


def test_a_parquet_file_larger_than_a_piece_is_cut_at_row_groups_and_read_once(tmp_path, monkeypatch):
    monkeypatch.setattr("gptcli.sources.BATCH_ROWS", 3)  # several record batches per row group
    docs = _documents(200, seed=1)
    (tmp_path / "parts").mkdir()
    _write_parquet(tmp_path / "parts" / "a.parquet", docs[:120], row_group_size=10)
    _write_parquet(tmp_path / "parts" / "b.parquet", docs[120:], row_group_size=30)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    # A quoted glob is expanded by prepare (sorted), as a shell would.
    result = prepare([Path(str(tmp_path / "parts" / "*.parquet"))], tmp_path / "out", val_ratio=0.2, shard_mb=0.01)
    assert len(result.index["pieces"]) > 3
    prepare([jsonl], tmp_path / "ref", val_ratio=0.2)
    for split in ("train", "val"):
        got = [d.tolist() for d in read_documents(tmp_path / "out", split)]
        assert got == [d.tolist() for d in read_documents(tmp_path / "ref", split)], split
    rerun = prepare([tmp_path / "parts"], tmp_path / "out", val_ratio=0.2, shard_mb=0.01)  # a folder: the same files
    assert rerun.pieces_done == 0 and rerun.pieces_kept == len(result.index["pieces"])


def test_parquet_without_the_column_or_with_a_null_text_is_a_one_line_error(cli, tmp_path):
    path = _write_parquet(tmp_path / "body.parquet", ["a b c"] * 3, field="body")
    _one_line_error(cli("prepare", path, "--out", tmp_path / "o1"), "body.parquet", 'no column "text"', "body", "--field")
    assert cli("prepare", path, "--field", "body", "--out", tmp_path / "o2").exit_code == 0
    nulls = _write_parquet(tmp_path / "nulls.parquet", ["fine", None, "also fine"], row_group_size=2)
    _one_line_error(cli("prepare", nulls, "--out", tmp_path / "o3"), "nulls.parquet", "row 1", "null")
    assert not (tmp_path / "o3").exists()
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    _one_line_error(cli("prepare", garbage, "--out", tmp_path / "o4"), "garbage.parquet", "not a readable Parquet file")


def test_parquet_and_hf_inputs_without_the_data_extra_name_it(cli, tmp_path, monkeypatch):
    path = _write_parquet(tmp_path / "docs.parquet", ["a b c"])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    _one_line_error(cli("prepare", path, "--out", tmp_path / "o1"), "docs.parquet", "pyarrow", "gptcli[data]")
    _one_line_error(cli("prepare", "hf:roneneldan/TinyStories", "--split", "train", "--out", tmp_path / "o2"),
                    "hf:roneneldan/TinyStories", "datasets", "gptcli[data]")


def test_split_applies_to_hf_inputs_only(cli, tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    _one_line_error(cli("prepare", tmp_path / "a.txt", "--split", "train", "--out", tmp_path / "o"), "--split", "hf:")


# ---------------------------------------------------------------- Hugging Face datasets


def test_saved_and_streamed_datasets_give_the_parquet_shards(tmp_path):
    """issue 16 acceptance: save_to_disk and streamed local Parquet shards equal the Parquet path."""
    datasets = pytest.importorskip("datasets")
    docs = _documents(80, seed=2)
    (tmp_path / "data").mkdir()
    parquet = _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", docs)
    prepare([parquet], tmp_path / "ref", val_ratio=0.2)
    reference = _shard_bytes(tmp_path / "ref")

    datasets.Dataset.from_parquet(str(parquet)).save_to_disk(str(tmp_path / "saved"))
    prepare([Path(f"hf:{tmp_path / 'saved'}")], tmp_path / "out-saved", val_ratio=0.2)
    assert _shard_bytes(tmp_path / "out-saved") == reference
    datasets.DatasetDict({"train": datasets.Dataset.from_parquet(str(parquet))}).save_to_disk(str(tmp_path / "dict"))
    prepare([Path(f"hf:{tmp_path / 'dict'}")], tmp_path / "out-dict", val_ratio=0.2, split="train")
    assert _shard_bytes(tmp_path / "out-dict") == reference

    # A folder of datasets-style shards, read through datasets in streaming mode.
    prepare([Path(f"hf:{tmp_path / 'data'}")], tmp_path / "out-stream", val_ratio=0.2, split="train")
    assert _shard_bytes(tmp_path / "out-stream") == reference
    assert _splits(tmp_path / "out-stream") == _splits(tmp_path / "ref")


def test_a_streamed_dataset_rerun_after_a_crash_keeps_finished_shards_and_matches(tmp_path, monkeypatch):
    """Resumable like text inputs: each shard of a stream is a piece, recorded when written."""
    pytest.importorskip("datasets")
    (tmp_path / "data").mkdir()
    docs = _documents(90, seed=3)
    for k in range(3):
        _write_parquet(tmp_path / "data" / f"train-{k:05d}-of-00003.parquet", docs[30 * k : 30 * (k + 1)])
    given = [Path(f"hf:{tmp_path / 'data'}")]
    reference = prepare(given, tmp_path / "ref", val_ratio=0.2, split="train")
    assert len(reference.index["pieces"]) == 3

    real, calls = shards._tokenize_piece, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while writing the second piece
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "_tokenize_piece", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(given, tmp_path / "out", val_ratio=0.2, split="train")
    monkeypatch.setattr(shards, "_tokenize_piece", real)
    rerun = prepare(given, tmp_path / "out", val_ratio=0.2, split="train")
    assert (rerun.pieces_kept, rerun.pieces_done) == (1, 2)
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")


def test_a_hub_dataset_offline_is_a_one_line_error_saying_how_to_get_it(cli, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    line = _one_line_error(cli("prepare", "hf:gptcli-tests/no-such-corpus:default", "--split", "train",
                               "--out", tmp_path / "o"), "hf:gptcli-tests/no-such-corpus", "offline")
    assert "hf download --repo-type dataset gptcli-tests/no-such-corpus" in line and "hf:DIR" in line
    _one_line_error(cli("prepare", "hf:gptcli-tests/no-such-corpus", "--out", tmp_path / "o"), "--split")


# ---------------------------------------------------------------- token width


class _WideVocabulary:
    """The GPT-2 tokenizer claiming a vocabulary beyond uint16 (as cl100k_base or o200k_base would)."""

    def __init__(self, n_vocab: int):
        self._enc, self.n_vocab, self.name = get_tokenizer(), n_vocab, "gpt2-wide"

    def encode_to_numpy(self, *args, **kwargs):
        return self._enc.encode_to_numpy(*args, **kwargs)


def test_a_vocabulary_beyond_uint16_gets_uint32_shards_that_read_back(tmp_path, monkeypatch):
    """issue 16 item 5: uint32 shards, recorded in index.json and honoured by the readers."""
    from gptcli.config import DataConfig
    from gptcli.data import load_splits

    docs = _documents(40, seed=4)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    prepare([tmp_path / "docs.jsonl"], tmp_path / "narrow", val_ratio=0.2)
    monkeypatch.setattr(shards, "get_tokenizer", lambda: _WideVocabulary(100277))
    result = prepare([tmp_path / "docs.jsonl"], tmp_path / "wide", val_ratio=0.2)
    assert result.index["dtype"] == "uint32" and result.index["vocab_size"] == 100277
    for split in ("train", "val"):
        entry = result.index["splits"][split]
        assert sum((tmp_path / "wide" / e["file"]).stat().st_size for e in entry["shards"]) == 4 * entry["tokens"]
        assert [d.tolist() for d in read_documents(tmp_path / "wide", split)] == \
            [d.tolist() for d in read_documents(tmp_path / "narrow", split)]
    wide, narrow = (load_splits(DataConfig(path=str(tmp_path / d)), 16) for d in ("wide", "narrow"))
    assert wide.train.tokens[0:len(wide.train.tokens)].tolist() == narrow.train.tokens[0:len(narrow.train.tokens)].tolist()
    again = prepare([tmp_path / "docs.jsonl"], tmp_path / "wide", val_ratio=0.2)  # the size check knows the width
    assert again.pieces_kept == 1 and again.pieces_done == 0


def test_a_vocabulary_beyond_uint32_is_refused(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "get_tokenizer", lambda: _WideVocabulary(2**32 + 1))
    (tmp_path / "a.txt").write_text("hello")
    _one_line_error(cli("prepare", tmp_path / "a.txt", "--out", tmp_path / "out"), str(2**32 + 1), "uint32")


def test_a_text_leaf_nested_in_a_struct_column_is_not_the_text_column(cli, tmp_path):
    path = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"meta": pa.array([{"text": "hello"}])}), path)
    line = _one_line_error(cli("prepare", path, "--out", tmp_path / "o"), "nested.parquet", 'no column "text"', "meta")
    assert "meta.text" in line
    assert not (tmp_path / "o").exists()


def test_a_local_hf_folder_changed_after_prepare_is_prepared_again(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "shards").mkdir()
    given = [Path(f"hf:{tmp_path / 'shards'}")]
    _write_parquet(tmp_path / "shards" / "a.parquet", ["one doc", "two doc"])
    prepare(given, tmp_path / "out", val_ratio=0, split="train")
    _write_parquet(tmp_path / "shards" / "a.parquet", ["an entirely different and much longer document about rivers"] * 3)
    rerun = prepare(given, tmp_path / "out", val_ratio=0, split="train")
    fresh = prepare(given, tmp_path / "fresh", val_ratio=0, split="train")
    assert (rerun.pieces_done, rerun.pieces_kept) == (1, 0)
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "fresh")
    assert _splits(tmp_path / "out") == _splits(tmp_path / "fresh")


def test_split_on_a_saved_dataset_without_split_names_is_refused(cli, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "saved"))
    _one_line_error(cli("prepare", f"hf:{tmp_path / 'saved'}", "--split", "test", "--out", tmp_path / "o"), "--split", "test")


def test_parquet_and_jsonl_cut_into_several_pieces_give_the_same_token_streams(tmp_path):
    """What the README claims across formats: the streams and splits, not the shard files, once pieces differ."""
    docs = _documents(120, seed=4)
    _write_parquet(tmp_path / "d.parquet", docs, row_group_size=5)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    streams = {}
    for name in ("d.parquet", "d.jsonl"):
        out = tmp_path / f"out-{name}"
        result = prepare([tmp_path / name], out, val_ratio=0.2, shard_mb=0.005)
        assert len(result.index["pieces"]) > 2
        streams[name] = {s: b"".join((out / e["file"]).read_bytes() for e in result.index["splits"][s]["shards"])
                         for s in ("train", "val")}
    assert streams["d.parquet"] == streams["d.jsonl"]

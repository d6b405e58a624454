"""gptcli prepare: token shards that read back exactly, a stable split, crash-safe reruns, one-line errors."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptcli import shards
from gptcli.shards import cut_text, is_validation, prepare, read_documents
from gptcli.tokenizer import END_OF_TEXT_ID, encode, get_tokenizer

from conftest import gptcli_cmd

WORDS = ("the cat's 12 naïve  dogs\tran, über 東京 🙂 -- it'll re-run (x) ... "
         "<|endoftext|> well\n\nnew\r\nline   spaced\u00a0nbsp\u3000wide").split(" ")


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _corpus(root: Path, rng: random.Random) -> list[str]:
    """A mixed corpus; returns its documents in input order (folders sorted)."""
    docs = []
    (root / "b").mkdir(parents=True)
    for name in ("a1.txt", "a2.txt"):
        docs.append(_text(rng, rng.randint(50, 400)))
        (root / name).write_text(docs[-1], encoding="utf-8")
    records = [_text(rng, rng.randint(1, 300)) for _ in range(40)]
    with open(root / "b" / "c.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(records):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            if i == 5:
                f.write("\n")  # blank lines are skipped
    docs += records
    docs.append(_text(rng, 3000))  # several segments: it is larger than a piece
    (root / "b" / "d.txt").write_text(docs[-1], encoding="utf-8")
    docs.append(_text(rng, 500))
    with gzip.open(root / "b" / "e.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[-1])
    gz_records = [_text(rng, rng.randint(1, 50)) for _ in range(5)]
    with gzip.open(root / "b" / "f.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in gz_records)
    return docs + gz_records


def _split_of(text: str, val_ratio: float) -> str:
    return "val" if is_validation(hashlib.sha256(text.encode("utf-8")).digest(), val_ratio) else "train"


def _documents_of(text: str) -> list[list[int]]:
    """The token ids of a text's documents as the text reader has them: a written <|endoftext|> ends one."""
    docs = [[]]
    for t in encode(text):
        docs.append([]) if t == END_OF_TEXT_ID else docs[-1].append(t)
    return docs


def test_prepare_reads_back_each_document_tokenized_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "TASK_CHARS", 97)  # many chunks per document: every cut must be exact
    docs = _corpus(tmp_path / "corpus", random.Random(0))
    result = prepare([tmp_path / "corpus"], tmp_path / "out", workers=3, val_ratio=0.3, shard_mb=0.004)
    for split in ("train", "val"):
        expected = [ids for d in docs if _split_of(d, 0.3) == split for ids in _documents_of(d)]
        got = [d.tolist() for d in read_documents(tmp_path / "out", split)]
        assert got == expected, split
        assert expected  # both splits hold documents
        entry = result.index["splits"][split]
        assert entry["documents"] == len(expected)
        assert entry["tokens"] == sum(len(e) + 1 for e in expected)  # each document + <|endoftext|>
        stream = b"".join((tmp_path / "out" / shard["file"]).read_bytes() for shard in entry["shards"])
        assert np.frombuffer(stream, dtype=np.uint16).tolist() == [t for e in expected for t in e + [END_OF_TEXT_ID]]
        for shard in entry["shards"]:
            data = (tmp_path / "out" / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert len(result.index["pieces"]) > 3
    assert not (tmp_path / "out" / ".partial").exists()


TRICKY = st.lists(st.sampled_from(list("ab1 \n\t\r.'s\u00a0\u3000\x1c東🙂-") + ["'ll", "  ", "\n\n"]), max_size=150).map("".join)


@settings(max_examples=300, deadline=None)
@given(TRICKY, st.integers(1, 12))
def test_cutting_at_safe_points_tokenizes_like_the_whole_text(text, size):
    enc = get_tokenizer()
    chunks, rest = cut_text(text, size)
    assert "".join(chunks) + rest == text
    assert [t for c in chunks + [rest] for t in enc.encode_ordinary(c)] == enc.encode_ordinary(text)


def test_split_is_stable_when_a_file_is_added(tmp_path):
    rng = random.Random(1)
    (tmp_path / "corpus").mkdir()
    plain = lambda n: _text(rng, n).replace("<|endoftext|>", "")  # one document each (a written marker ends one)
    old = [plain(20) + f" {i}" for i in range(60)]
    (tmp_path / "corpus" / "m.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in old))
    prepare([tmp_path / "corpus"], tmp_path / "before", val_ratio=0.5)
    new = [plain(20) + f" new {i}" for i in range(30)]
    (tmp_path / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in new))
    prepare([tmp_path / "corpus"], tmp_path / "after", val_ratio=0.5)

    def sides(out: Path) -> dict[str, set]:
        return {s: {tuple(d) for d in read_documents(out, s)} for s in ("train", "val")}

    before, after = sides(tmp_path / "before"), sides(tmp_path / "after")
    assert before["train"] and before["val"]
    assert before["train"] <= after["train"] and before["val"] <= after["val"]
    assert not after["train"] & after["val"]
    assert len(after["train"]) + len(after["val"]) == 90


def test_prepare_killed_with_sigkill_and_rerun_gives_identical_shards(tmp_path, subprocess_env):
    rng = random.Random(2)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):  # ~3 MB in ~30 pieces: the kill lands half way even on a fast machine
        (corpus / f"{i:02d}.jsonl").write_text(
            "".join(json.dumps({"text": _text(rng, 150)}) + "\n" for _ in range(150)), encoding="utf-8")
    args = [str(corpus), "--shard-mb", "0.1", "--val-ratio", "0.1"]
    reference = subprocess.run(gptcli_cmd() + ["prepare", *args, "--out", "ref", "--workers", "1"],
                               cwd=tmp_path, env=subprocess_env, capture_output=True, timeout=300)
    assert reference.returncode == 0, reference.stderr

    proc = subprocess.Popen(gptcli_cmd() + ["prepare", *args, "--out", "out", "--workers", "2"],
                            cwd=tmp_path, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "out" / ".partial"
    deadline = time.monotonic() + 120
    while not (partial.is_dir() and len(list(partial.glob("piece-*.json"))) >= 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "out" / "index.json").exists()  # it really stopped half way

    rerun = subprocess.run(gptcli_cmd() + ["prepare", *args, "--out", "out", "--json"],
                           cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["pieces_kept"] >= 2 and summary["pieces_done"] >= 1
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "out").iterdir())  # no leftovers
    for name in files:
        if name != "index.json":
            assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    ref_index, out_index = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("ref", "out"))
    assert {k: v for k, v in ref_index.items() if k != "created"} == {k: v for k, v in out_index.items() if k != "created"}


# ---------------------------------------------------------------- bad input: one line, exit 2


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_prepare_without_inputs_is_a_usage_error(cli, tmp_path):
    _one_line_error(cli("prepare", "--out", tmp_path / "out"), "Missing argument", "inputs")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a corpus")
    _one_line_error(cli("prepare", tmp_path / "empty", "--out", tmp_path / "out"), "no input files", "empty")
    _one_line_error(cli("prepare", tmp_path / "missing.txt", "--out", tmp_path / "out"), "missing.txt", "not found")


def test_unreadable_inputs_are_named(cli, tmp_path):
    bad_gz = tmp_path / "broken.txt.gz"
    bad_gz.write_bytes(gzip.compress(b"hello world " * 100)[:-20])
    _one_line_error(cli("prepare", bad_gz, "--out", tmp_path / "o1"), "broken.txt.gz", "cannot read")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    _one_line_error(cli("prepare", latin, "--out", tmp_path / "o2"), "latin.txt", "not UTF-8", "offset 3")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.txt"
        locked.write_text("secret")
        locked.chmod(0)
        _one_line_error(cli("prepare", locked, "--out", tmp_path / "o3"), "locked.txt", "cannot read")


def test_jsonl_record_without_the_field_names_file_and_line(cli, tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document number {i} " * 50}) for i in range(400)]
    lines[321] = json.dumps({"body": "no text here"})
    path.write_text("\n".join(lines) + "\n")
    # Small pieces: the bad line lies in a later piece, which counts the lines before it.
    _one_line_error(cli("prepare", path, "--out", tmp_path / "out", "--shard-mb", "0.05"),
                    f"{path}:322", '"text"')
    lines[321] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    _one_line_error(cli("prepare", path, "--out", tmp_path / "out2"), f"{path}:322", "not a JSON record")


def test_out_must_be_a_prepare_directory(cli, tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.me").write_text("x")
    _one_line_error(cli("prepare", tmp_path / "a.txt", "--out", tmp_path / "other"), "other", "not written by gptcli prepare")
    assert (tmp_path / "other" / "keep.me").exists()


# ---------------------------------------------------------------- training on shards


@pytest.fixture
def prepared(tmp_path, verdict) -> Path:
    """The book's corpus cut into 40 documents, prepared into several small shards."""
    text = verdict.read_text(encoding="utf-8")
    step = len(text) // 40
    lines = [json.dumps({"text": text[i : i + step]}) for i in range(0, len(text), step)]
    (tmp_path / "verdict.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare([tmp_path / "verdict.jsonl"], tmp_path / "prepared", val_ratio=0.15, shard_mb=0.004)
    return tmp_path / "prepared"


def test_windows_read_from_shards_equal_the_token_stream(prepared):
    from gptcli.config import DataConfig
    from gptcli.data import load_splits

    index = json.loads((prepared / "index.json").read_text())
    splits = load_splits(DataConfig(path=str(prepared), stride=7), 32)
    for windows, split in ((splits.train, "train"), (splits.val, "val")):
        shard_files = [e["file"] for e in index["splits"][split]["shards"]]
        stream = np.concatenate([np.fromfile(prepared / f, dtype=np.uint16) for f in shard_files]).astype(np.int64)
        assert len(windows.tokens) == len(stream) == index["splits"][split]["tokens"]
        assert len(windows) == len(range(0, len(stream) - 32, 7))
        for i in range(len(windows)):  # every window, many of them across two shards
            x, y = windows[i]
            assert x.dtype == torch.int64
            assert x.tolist() == stream[7 * i : 7 * i + 32].tolist() and y.tolist() == stream[7 * i + 1 : 7 * i + 33].tolist()
    assert len(index["splits"]["train"]["shards"]) > 3


def test_random_windows_are_reproducible_and_resume_mid_epoch():
    from gptcli.data import WindowBatchSampler

    sampler = WindowBatchSampler(50, 4, shuffle=True, drop_last=True, draw_from=1000)
    torch.manual_seed(0)
    full = list(sampler)
    assert len(full) == 12 and all(len(b) == 4 and all(0 <= i < 1000 for i in b) for b in full)
    assert any(i % 32 for b in full for i in b)  # any offset, not a window grid
    sampler.resume(sampler.seed, 5 * 4)
    assert list(sampler) == full[5:]
    ranks = [WindowBatchSampler(50, 2, True, True, rank=r, world_size=2, draw_from=1000) for r in range(2)]
    for r in ranks:
        r.resume(sampler.seed, 0)
    assert [a + b for a, b in zip(*map(list, ranks))] == full
    torch.manual_seed(1)
    assert list(sampler) != full  # another epoch seed, other windows


@pytest.mark.parametrize("sampling", ["sliding", "random"])
def test_resume_on_shards_is_exact(prepared, tmp_path, sampling):
    from safetensors.torch import load_file

    from gptcli.config import load_config
    from gptcli.train import train

    from conftest import CONFIGS, keep_checkpoints_up_to

    # An evaluation (which draws from the RNG) before and after the checkpoint at step 3.
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(prepared), "train.device": "cpu", "train.max_steps": 6},
                      [f"data.sampling={sampling}", "train.save_freq=3", "train.eval_freq=4", "train.peak_flops=1e12",
                       "train.max_new_tokens=0"])
    train(cfg, tmp_path / "run")
    run = keep_checkpoints_up_to(tmp_path / "run", tmp_path / "resumed", 3)
    train(cfg, run, resume=True)
    straight = load_file(str(tmp_path / "run" / "step-000006" / "model.safetensors"))
    resumed = load_file(str(run / "step-000006" / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# ---------------------------------------------------------------- what prepare may touch, and what it reads


def test_prepare_refuses_a_folder_whose_index_json_is_not_its_own_and_deletes_nothing(cli, tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    site = tmp_path / "site"
    (site / ".partial").mkdir(parents=True)
    files = {"index.json": '{"my": "site"}', "train-000003.bin": "precious", ".tmp-notes": "keep",
             ".partial/file.part": "data"}
    for name, text in files.items():
        (site / name).write_text(text)
    _one_line_error(cli("prepare", tmp_path / "a.txt", "--out", site), "site", "index.json", "not a gptcli shard index")
    assert {name: (site / name).read_text() for name in files} == files


def test_prepare_refuses_a_partial_folder_it_did_not_mark(cli, tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    out = tmp_path / "out"
    (out / ".partial").mkdir(parents=True)
    (out / ".partial" / "mine.txt").write_text("the user's")
    (out / "train-000000.bin").write_text("the user's too")
    _one_line_error(cli("prepare", tmp_path / "a.txt", "--out", out), ".partial", "not written by gptcli prepare")
    assert (out / ".partial" / "mine.txt").read_text() == "the user's"
    assert (out / "train-000000.bin").read_text() == "the user's too"


def test_a_rerun_into_its_own_folder_deletes_only_what_prepare_wrote(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 2000)
    prepare([tmp_path / "a.txt"], tmp_path / "out", val_ratio=0, shard_mb=0.004)
    assert (tmp_path / "out" / "train-000005.bin").exists()
    notes = {"notes.txt": "mine", ".tmp-notes": "mine", "train-000099.bin": "mine"}
    for name, text in notes.items():
        (tmp_path / "out" / name).write_text(text)
    (tmp_path / "a.txt").write_text("hello world")  # one piece now: the pieces 1.. of the first run go
    prepare([tmp_path / "a.txt"], tmp_path / "out", val_ratio=0, shard_mb=0.004)
    assert not (tmp_path / "out" / "train-000005.bin").exists()
    assert {name: (tmp_path / "out" / name).read_text() for name in notes} == notes


def test_a_jsonl_record_with_a_lone_surrogate_is_an_input_error_naming_its_line(cli, tmp_path):
    path = tmp_path / "sur.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "bad \\ud800"}\n')
    for ratio in ("0.01", "0"):
        _one_line_error(cli("prepare", path, "--out", tmp_path / "o", "--val-ratio", ratio), f"{path}:2", "surrogate")
        assert not (tmp_path / "o").exists()


def test_any_failure_removes_the_output_folder_prepare_created_but_never_an_earlier_one(cli, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("hello world")

    def broken(encoding, task):
        raise RuntimeError("a bug")

    monkeypatch.setattr(shards, "_encode_task", broken)
    with pytest.raises(RuntimeError):
        prepare([tmp_path / "a.txt"], tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError):
        prepare([tmp_path / "a.txt"], tmp_path / "empty")
    assert (tmp_path / "empty").is_dir()


def test_a_byte_order_mark_does_not_change_a_documents_split(tmp_path):
    text = "A short story about a fox.\n"
    (tmp_path / "plain.txt").write_bytes(text.encode())
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    ratio = 0.7 if _split_of(text, 0.7) == "val" else 0.3  # the side the text's own hash picks
    for name in ("plain.txt", "bom.txt", "doc.jsonl"):
        splits = prepare([tmp_path / name], tmp_path / f"out-{name}", val_ratio=ratio).index["splits"]
        assert (splits["train"]["documents"], splits["val"]["documents"]) == ((0, 1) if ratio == 0.7 else (1, 0)), name


def test_a_literal_endoftext_gives_the_same_tokens_in_prepare_and_the_text_reader(tmp_path):
    from gptcli.data import read_corpus
    from gptcli.tokenizer import encode

    text = "First story ends here.<|endoftext|>Second story begins and goes on for a while longer.\n"
    (tmp_path / "s.txt").write_text(text)
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": text}) + "\n")
    for name in ("s.txt", "s.jsonl"):
        prepare([tmp_path / name], tmp_path / f"out-{name}", val_ratio=0)
        shard = np.fromfile(tmp_path / f"out-{name}" / "train-000000.bin", dtype=np.uint16).tolist()
        assert shard == encode(read_corpus(tmp_path / name)) + [END_OF_TEXT_ID], name
        assert shard.count(END_OF_TEXT_ID) == 2
    # Every piece cut right after a marker (a space follows each): the .docs.npy starts are the token
    # after every <|endoftext|>, which is what document_mask reads from a window.
    (tmp_path / "many.txt").write_text("story<|endoftext|> " * 300)
    result = prepare([tmp_path / "many.txt"], tmp_path / "out-many", val_ratio=0, shard_mb=0.0005)
    assert len(result.index["pieces"]) > 5
    stream, starts = [], []
    for e in result.index["splits"]["train"]["shards"]:
        starts += [len(stream) + int(x) for x in np.load(tmp_path / "out-many" / e["docs_file"])]
        stream += np.fromfile(tmp_path / "out-many" / e["file"], dtype=np.uint16).tolist()
    assert stream == encode(read_corpus(tmp_path / "many.txt")) + [END_OF_TEXT_ID]
    assert starts == [0] + [i + 1 for i, t in enumerate(stream[:-1]) if t == END_OF_TEXT_ID]


def test_prepare_refuses_options_that_cannot_apply(cli, tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "a.jsonl").write_text('{"text": "para one\\n\\npara two"}\n')
    _one_line_error(cli("prepare", tmp_path / "a.txt", "--field", "body", "--out", tmp_path / "o1"), "--field", "text files")
    _one_line_error(cli("prepare", tmp_path / "a.jsonl", "--split-docs", "blank-lines", "--out", tmp_path / "o2"),
                    "--split-docs", "text files")
    assert cli("prepare", tmp_path / "a.txt", tmp_path / "a.jsonl", "--split-docs", "blank-lines",
               "--out", tmp_path / "o3").exit_code == 0


def test_empty_split_advice_fits_the_inputs(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    index = prepare([tmp_path / "a.jsonl"], tmp_path / "o1", val_ratio=0).index
    [warning] = shards.empty_split_warnings(index)
    assert "split_docs" not in warning and "val_ratio" in warning
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    [warning] = shards.empty_split_warnings(prepare([tmp_path / "a.txt"], tmp_path / "o2", val_ratio=0).index)
    assert "split_docs" in warning


def test_files_skipped_in_a_folder_are_reported(cli, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.jsonl", "UP.TXT", "notes.md"):
        (corpus / name).write_text('{"text": "x"}\n' if name.endswith("jsonl") else "some text")
    result = cli("prepare", corpus, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert "2 file(s)" in line and "UP.TXT" in line


def test_utf8_error_offsets_point_at_the_bad_byte(cli, tmp_path):
    (tmp_path / "trunc.txt").write_bytes(b"ok text \xe2\x82")
    _one_line_error(cli("prepare", tmp_path / "trunc.txt", "--out", tmp_path / "o1"), "truncated character at offset 8")
    n = shards.READ_BLOCK
    (tmp_path / "boundary.txt").write_bytes(b"a" * (n - 2) + "\u20ac".encode() + b"bcd" + b"\xff" + b"tail")
    _one_line_error(cli("prepare", tmp_path / "boundary.txt", "--out", tmp_path / "o2"), f"invalid byte at offset {n + 4}")


def test_the_summary_rate_counts_only_tokens_tokenized_in_this_run(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    first = prepare([tmp_path / "a.txt"], tmp_path / "o", val_ratio=0)
    assert first.tokens_done == first.index["splits"]["train"]["tokens"] > 0
    assert prepare([tmp_path / "a.txt"], tmp_path / "o", val_ratio=0).tokens_done == 0


def test_an_empty_split_of_a_prepared_folder_advises_prepare(tmp_path, verdict):
    from gptcli.config import DataConfig
    from gptcli.data import load_splits
    from gptcli.errors import InputError

    prepare([verdict], tmp_path / "nv", val_ratio=0, split_docs="blank-lines")
    with pytest.raises(InputError, match="val_ratio") as e:
        load_splits(DataConfig(path=str(tmp_path / "nv")), 32)
    assert "smaller context_length" not in str(e.value)


def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_temporary(cli, tmp_path, monkeypatch):
    """A full disk while shards were written printed 'internal error: OSError' (the close of the failed shard
    raised again, and the other split's temporary shard stayed)."""
    import errno

    rng = random.Random(3)
    (tmp_path / "in.txt").write_text("\n\n".join(_text(rng, 50) for _ in range(200)), encoding="utf-8")
    real_write = shards._ShardWriter.write

    def full(self, arr, starts_doc):
        real_write(self, arr, starts_doc)
        if self.tokens > 2000:  # the disk fills part-way through a shard; the buffered rest cannot be flushed
            self.file.close = lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards._ShardWriter, "write", full)
    for out, created in ((tmp_path / "new", True), (tmp_path / "kept", False)):
        if not created:
            out.mkdir()
        result = cli("prepare", tmp_path / "in.txt", "--out", out, "--split-docs", "blank-lines", "--shard-mb", "0.01")
        assert result.exit_code == 1, result.stderr
        assert result.stderr.startswith("error: ") and "No space left on device" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert out.exists() != created
        assert created or not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]

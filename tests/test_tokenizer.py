"""The offline tokenizer is tiktoken's gpt2 encoding, id for id."""

import hashlib
from pathlib import Path

import pytest

from gptcli import tokenizer

SAMPLES = [
    "Every effort moves you",
    "Hello, world!",
    "  leading spaces,   runs of   spaces\n\n\nand newlines\r\n\ttabs",
    "unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, emoji 🤖🚀, combining é",
    "numbers 12345 3.14159 1e-10 and punctuation ...!?;:'\"()[]{}",
    "contractions: don't, I'm, you're, we've, they'll, she'd",
    "<|endoftext|>",
    "first document<|endoftext|>second document",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "",
]


def test_same_ids_as_tiktoken_gpt2_offline(tiktoken_offline, no_network):
    import tiktoken

    reference = tiktoken.get_encoding("gpt2")
    ours = tokenizer.get_tokenizer()
    assert ours.n_vocab == reference.n_vocab == 50257
    assert ours.eot_token == 50256
    for text in SAMPLES:
        expected = reference.encode(text, allowed_special={"<|endoftext|>"})
        assert tokenizer.encode(text) == expected, text
        assert tokenizer.decode(expected) == text


def test_known_ids_from_the_book(no_network):
    # The book, chapter 2 and 4: "Every effort moves you" and "Hello, world".
    assert tokenizer.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert tokenizer.encode("Hello, world") == [15496, 11, 995]
    assert tokenizer.encode("<|endoftext|>") == [50256]


def _tiktokens_published_gpt2_hashes(monkeypatch) -> dict[str, str]:
    """The sha256 hashes tiktoken_ext/openai_public.py's gpt2() passes to its loader, read by
    calling gpt2() with the loader replaced by a recorder (no download, nothing restated here)."""
    import tiktoken_ext.openai_public as openai_public

    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", record)
    openai_public.gpt2()
    return {"vocab.bpe": seen["vocab_bpe_hash"], "encoder.json": seen["encoder_json_hash"]}


def test_packaged_files_match_tiktokens_hashes(monkeypatch):
    published = _tiktokens_published_gpt2_hashes(monkeypatch)
    for path in tokenizer.bpe_files():
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == published[Path(path).name], path
    # and the module checks against those same hashes (a wrong constant there would refuse good files)
    assert (tokenizer.VOCAB_BPE_SHA256, tokenizer.ENCODER_JSON_SHA256) == (published["vocab.bpe"], published["encoder.json"])


def test_tampered_bpe_file_is_refused(monkeypatch, tmp_path):
    import gptcli.tokenizer as tok
    from gptcli.errors import RunError

    data = tmp_path / "data"
    data.mkdir()
    vocab_bpe, encoder_json = tokenizer.bpe_files()
    (data / "vocab.bpe").write_bytes(open(vocab_bpe, "rb").read() + b"x")
    (data / "encoder.json").write_bytes(open(encoder_json, "rb").read())
    monkeypatch.setattr(tok, "_package_dir", lambda package: tmp_path)
    with pytest.raises(RunError, match="sha256"):
        tok.bpe_files()

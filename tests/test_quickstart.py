"""The offline quick start: configs/quickstart.yaml on data/quickstart.txt, as the README runs it."""

from __future__ import annotations

import json

import pytest

from conftest import CONFIGS, ROOT
from gptcli.config import load_config
from gptcli.data import load_splits

CONFIG = CONFIGS / "quickstart.yaml"
CORPUS = ROOT / "data" / "quickstart.txt"


def test_config_points_at_the_shipped_corpus():
    cfg = load_config(CONFIG)
    assert (ROOT / cfg.data.path).resolve() == CORPUS.resolve()
    # Both splits hold at least one window: training and evaluation can start.
    splits = load_splits(cfg.data, cfg.model.context_length, path=str(CORPUS))
    assert min(splits.train_tokens, splits.val_tokens) > cfg.model.context_length


def test_corpus_is_plain_text_of_the_promised_size():
    raw = CORPUS.read_bytes()
    assert 20_000 <= len(raw) <= 50_000, f"{len(raw)} bytes"
    text = raw.decode("utf-8")
    odd = sorted({c for c in text if not (c == "\n" or " " <= c <= "~")})
    assert not odd, f"characters outside printable ASCII: {odd}"
    # Training text from its first byte: the license lives in data/README.md, not here.
    assert "license" not in text[:500].lower() and "cc0" not in text[:500].lower()
    assert "CC0 1.0" in (ROOT / "data" / "README.md").read_text(encoding="utf-8")


def test_quickstart_trains_and_generates_offline(cli, no_network, monkeypatch, tmp_path):
    """The README's two commands, shortened to 3 steps, from the checkout's root."""
    monkeypatch.chdir(ROOT)  # data.path is relative to where users run gptcli
    out = tmp_path / "qs"
    # A fixed peak_flops skips the one-time matmul probe (it only feeds the MFU figure).
    result = cli("train", "--config", CONFIG, "--out", out, "--max-steps", "3", "--device", "cpu",
                 "--set", "train.peak_flops=1e11", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 3
    assert summary["tokens_seen"] == 3 * load_config(CONFIG).train.batch_size * 128
    assert summary["val_loss"] == pytest.approx(10.8, abs=0.6)  # about ln(50257): untrained
    result = cli("generate", "--checkpoint", out, "Every morning", "--max-new-tokens", "5", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Every morning") and len(result.stdout) > len("Every morning")

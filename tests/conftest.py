"""Shared fixtures: tiny CPU configs, the book's corpus, the book's code as an oracle, no network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptcli.config import Config, ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
VERDICT = ROOT.parent / "shared" / "data" / "the-verdict.txt"
CONFIGS = ROOT / "configs"
FIXTURES = ROOT / "tests" / "fixtures"

# tiktoken's download URLs for the gpt2 files; its cache key is the sha1 of the URL.
TIKTOKEN_GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def pytest_report_header(config):
    return f"torch {torch.__version__}, corpus {VERDICT}"


@pytest.fixture(scope="session")
def _cache_dir(tmp_path_factory) -> Path:
    """One gptcli cache per test session: the peak-FLOPs probe runs once, not per test."""
    return tmp_path_factory.mktemp("gptcli-cache")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, _cache_dir):
    """Each test runs in its own working directory (so checkpoints/ starts empty)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTCLI_CACHE_DIR", str(_cache_dir))


@pytest.fixture
def verdict() -> Path:
    """The book's corpus, as laid beside the checkout in ../shared/data/."""
    if not VERDICT.is_file():
        pytest.fail(f"{VERDICT} is missing: tests need the book's corpus beside the checkout")
    return VERDICT


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def tiktoken_offline(tmp_path, monkeypatch):
    """Make tiktoken.get_encoding("gpt2") work offline by pre-filling its cache with the
    verified BPE files, so the book's code (which calls it) can serve as an oracle."""
    import tiktoken.registry

    from gptcli.tokenizer import bpe_files

    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    vocab_bpe, encoder_json = bpe_files()
    for name, path in (("vocab.bpe", vocab_bpe), ("encoder.json", encoder_json)):
        key = hashlib.sha1(TIKTOKEN_GPT2_URLS[name].encode()).hexdigest()
        shutil.copy(path, cache / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    return cache


def tiny_model_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1, qkv_bias=False)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def tiny_config(verdict) -> Config:
    """configs/tiny.yaml on the book's corpus, on the CPU."""
    return load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.device": "cpu"})


def book_config(cfg: ModelConfig) -> dict:
    """The book's GPT_CONFIG dict for a ModelConfig."""
    keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
    return {k: getattr(cfg, k) for k in keys}


def book_model(cfg: ModelConfig, seed: int = 123):
    """The book's GPTModel (llms-from-scratch), seeded, with the GELU of `cfg`."""
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(seed)
    model = GPTModel(book_config(cfg))
    if cfg.gelu == "exact":
        for block in model.trf_blocks:
            block.ff.layers[1] = torch.nn.GELU()
    return model


class Cli:
    """Runs `gptcli` in-process and keeps stdout and stderr apart."""

    def __init__(self):
        from gptcli.cli import app

        self.app = app
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None):
        return self.runner.invoke(self.app, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture
def cli() -> Cli:
    return Cli()


def gptcli_cmd() -> list[str]:
    """argv for running gptcli as a real process (signals, kills)."""
    return [sys.executable, "-m", "gptcli"]


@pytest.fixture
def subprocess_env(_cache_dir) -> dict:
    env = dict(os.environ)
    env["GPTCLI_CACHE_DIR"] = str(_cache_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_losses(run: Path) -> list[tuple]:
    """(event, step, loss, train_loss, val_loss, tokens_seen) of each metrics record: what equal runs share."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["event"], e["step"], e.get("loss"), e.get("train_loss"), e.get("val_loss"), e["tokens_seen"]) for e in events]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights of a run's newest verified checkpoint."""
    from gptcli.checkpoint import find_latest
    from safetensors.torch import load_file

    latest, _ = find_latest(run)
    return load_file(str(latest / "model.safetensors"))


def assert_equal_up_to_adamw_rounding(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float,
                                      steps: int) -> None:
    """Weights of two AdamW runs that differ only in float summation order are equal up to what
    AdamW makes of rounding, whatever the CPU (issue 12 finding 15: not one machine's figure).

    AdamW divides each gradient by its running RMS, so its update is about lr * sign(gradient): where a
    gradient's terms nearly cancel, summing them in another order (two processes' halves, micro-batches,
    another CPU's kernels) can flip its sign and move that weight by up to 2 lr per step. Everywhere else
    the runs agree to float rounding, far below 1 % of one update. A real difference (other windows, a
    missing all-reduce) moves most weights by about lr per step: training on other windows put 99 % of
    the weights beyond 1 % of an update (AdamW is blind to a gradient's scale, so no such test sees that).
    """
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a])
    bound = 2 * lr * steps  # the sign flips rounding can cause, at most
    tight = 0.01 * lr  # 1 % of one update: rounding alone never gets here without a flip
    worst, beyond = diff.max().item(), (diff > tight).double().mean().item()
    print(f"largest weight difference {worst:.3g} ({worst / lr:.3g} lr); beyond {tight:.3g}: {beyond:.3g} of the weights")
    assert worst <= bound, f"weights differ by up to {worst:.3g}, more than rounding can ({bound:.3g})"
    # a flip needs a gradient whose terms nearly cancel: a handful of weights, never 1 in 1000
    assert beyond <= 1e-3, f"{beyond:.3g} of the weights differ by more than {tight:.3g}: not rounding"


def keep_checkpoints_up_to(run: Path, dest: Path, step: int) -> Path:
    """A copy of run directory `run` at `dest` whose newest checkpoint is `step` (later ones removed)."""
    shutil.copytree(run, dest, symlinks=True)
    for d in dest.glob("step-*"):
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)
    for link in ("latest", "best"):
        (dest / link).unlink(missing_ok=True)
    return dest


def pytest_terminal_summary(terminalreporter):
    """Report the size of the bad-input matrix (tests/test_bad_input.py) with the results."""
    counts = {}
    for outcome in ("passed", "failed"):
        counts[outcome] = sum(1 for r in terminalreporter.stats.get(outcome, [])
                              if "test_bad_input.py::test_bad_input[" in r.nodeid and r.when == "call")
    if counts["passed"] or counts["failed"]:
        terminalreporter.write_line(
            f"bad-input matrix: {counts['passed'] + counts['failed']} bad inputs tried, "
            f"{counts['passed']} handled as specified, {counts['failed']} not")

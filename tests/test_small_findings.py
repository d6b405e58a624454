"""The small findings of issue 12 (11: odd inputs; 12: round trips and files; 13: end of a run;
14: one big text file): each a clear error or warning, or the behaviour a user expects."""

import pytest

from conftest import CONFIGS
from gptcli.tokenizer import encode
from test_evaluate import save_model_checkpoint
from test_generate import one_thread  # noqa: F401 (an autouse fixture)

TINY = str(CONFIGS / "tiny.yaml")


@pytest.fixture
def ckpt(tiny_config, tmp_path):
    """A tiny step checkpoint (random weights) in ./checkpoints/tiny/."""
    return save_model_checkpoint(tmp_path / "checkpoints" / "tiny", tiny_config, 10, seed=3)


def one_line_exit_2(r, *needles: str) -> None:
    assert r.exit_code == 2, r.stderr
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


# ---------------------------------------------------------------- finding 11: odd inputs


@pytest.mark.parametrize("name", ["cpu:1", "", "mps:3", " cpu"])
def test_device_names_torch_would_drop_or_misread_are_refused(cli, ckpt, name):
    """issue 12 finding 11: `--device cpu:1` and `--device ''` were accepted (the index or the flag dropped)."""
    r = cli("generate", "hi", "--checkpoint", ckpt, "--device", name, "--max-new-tokens", "1")
    one_line_exit_2(r, "--device")


@pytest.mark.parametrize("command", [
    ["generate", "hi", "--max-new-tokens", "1"],
    ["eval", "--no-val", "--data", "x.txt"],
    ["loss", "--num-batches", "1"],
    ["train", "--config", TINY, "--max-steps", "1"],
])
def test_a_seed_beyond_64_bits_is_a_one_line_usage_error_in_every_command(cli, ckpt, command):
    """issue 12 finding 11: `--seed 99999999999999999999999` ended in an internal error."""
    r = cli(*command, "--seed", "99999999999999999999999")
    one_line_exit_2(r, "--seed", "64 bits")


def test_a_seed_beyond_64_bits_in_the_config_names_the_key(cli, ckpt):
    """issue 12 finding 11: the same seed through `--set` names train.seed."""
    r = cli("train", "--config", TINY, "--set", "train.seed=99999999999999999999999")
    one_line_exit_2(r, "train.seed", "64 bits")


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_temperature_that_is_not_a_finite_number_is_refused(cli, ckpt, value):
    """issue 12 finding 11: `--temperature inf` was accepted."""
    one_line_exit_2(cli("generate", "hi", "--checkpoint", ckpt, "--temperature", value), "--temperature")


@pytest.mark.parametrize("flag, value", [("--top-k", "5"), ("--top-p", "0.9")])
def test_top_k_and_top_p_are_never_silently_ignored_by_greedy_decoding(cli, ckpt, flag, value):
    """issue 12 finding 11: `--top-k` with temperature 0 was ignored without a word."""
    one_line_exit_2(cli("generate", "hi", "--checkpoint", ckpt, flag, value), flag, "--temperature 0")
    r = cli("generate", "hi", "--checkpoint", ckpt, flag, value, "--temperature", "1", "--max-new-tokens", "2")
    assert r.exit_code == 0, r.stderr


def test_a_prompt_longer_than_the_context_says_how_many_tokens_are_dropped(cli, ckpt):
    """issue 12 finding 11: a prompt longer than the context was cut without a warning."""
    prompt = "one two three " * 20
    n = len(encode(prompt))
    assert n > 32  # tiny.yaml's context_length
    r = cli("generate", prompt, "--checkpoint", ckpt, "--max-new-tokens", "2")
    assert r.exit_code == 0, r.stderr
    assert f"its first {n - 32} tokens are dropped" in r.stderr
    short = cli("generate", "one two", "--checkpoint", ckpt, "--max-new-tokens", "2")
    assert "dropped" not in short.stderr


def test_greedy_samples_warn_that_they_are_identical(cli, ckpt):
    """issue 12 finding 11: `--num-samples 3` with greedy decoding gave three equal samples without a word."""
    r = cli("generate", "hi", "--checkpoint", ckpt, "--num-samples", "3", "--max-new-tokens", "2")
    assert r.exit_code == 0, r.stderr
    assert "3 identical samples" in r.stderr
    r = cli("generate", "hi", "--checkpoint", ckpt, "--num-samples", "3", "--max-new-tokens", "2", "--temperature", "1")
    assert "identical" not in r.stderr


def test_prompt_dash_reads_the_prompt_from_stdin(cli, ckpt):
    """issue 12 finding 11: prompt `-` was taken literally instead of reading stdin."""
    from_stdin = cli("generate", "-", "--checkpoint", ckpt, "--max-new-tokens", "3", "--json", input="The river\n")
    given = cli("generate", "The river", "--checkpoint", ckpt, "--max-new-tokens", "3", "--json")
    assert from_stdin.exit_code == 0, from_stdin.stderr
    assert from_stdin.stdout.replace('"-"', '"The river"') == given.stdout
    assert '"prompt": "The river"' in from_stdin.stdout
    assert "reads it from stdin" in cli("generate", "--help").stdout

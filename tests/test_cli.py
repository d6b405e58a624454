"""The command line: commands, streams and exit codes, and the book's numbers end to end."""

import json

import pytest
import torch

from conftest import CONFIGS


def test_help_lists_the_core_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("train", "eval", "generate", "loss"):
        assert command in result.stdout


def test_generate_untrained_prints_the_books_output(cli):
    result = cli("generate", "Every effort moves you", "--max-new-tokens", "10", "--seed", "123",
                 "--config", CONFIGS / "gpt2-124m-256.yaml")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "Every effort moves you rentingetic wasnم refres RexMeCHicular stren\n"
    assert "untrained" in result.stderr  # the warning goes to stderr, not into the text


def test_loss_equals_the_books_calc_loss_loader(cli, verdict, tiktoken_offline):
    from conftest import book_model
    from gptcli.config import ModelConfig
    from llms_from_scratch.ch02 import create_dataloader_v1
    from llms_from_scratch.ch05 import calc_loss_loader

    text = verdict.read_text(encoding="utf-8")
    split = int(0.90 * len(text))
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(text[:split], batch_size=2, max_length=256, stride=256, drop_last=True, shuffle=True)
    val_loader = create_dataloader_v1(text[split:], batch_size=2, max_length=256, stride=256, drop_last=False, shuffle=False)
    model = book_model(ModelConfig()).eval()
    torch.manual_seed(123)
    with torch.no_grad():
        book_train, book_val = calc_loss_loader(train_loader, model, "cpu"), calc_loss_loader(val_loader, model, "cpu")
    assert round(book_train, 2) == 10.99 and round(book_val, 2) == 10.98  # the book prints about 10.98

    result = cli("loss", "--seed", "123", "--data", verdict, "--config", CONFIGS / "gpt2-124m-256.yaml", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert round(report["train"]["loss"], 5) == round(book_train, 5)
    assert round(report["val"]["loss"], 5) == round(book_val, 5)
    # exp of a float64 loss vs exp of its float32 tensor: they differ by float32 rounding (~6e-8 relative)
    assert report["train"]["ppl"] == pytest.approx(torch.tensor(book_train).exp().item(), rel=1e-6)

    table = cli("loss", "--seed", "123", "--data", verdict, "--config", CONFIGS / "gpt2-124m-256.yaml")
    assert f"{book_train:.5f}" in table.stdout and f"{book_val:.5f}" in table.stdout


@pytest.mark.parametrize(
    "content, problem",
    [(b"", "empty"), (b"\xff\xfe\x00bad", "not UTF-8"), (b"too short", "split has")],
)
def test_bad_data_exit_2_one_line(cli, tmp_path, content, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    for command in (["loss"], ["train"]):
        result = cli(*command, "--data", path, "--config", CONFIGS / "tiny.yaml")
        assert result.exit_code == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and problem in lines[0] and str(path) in lines[0], result.stderr
    missing = cli("loss", "--data", tmp_path / "missing.txt", "--config", CONFIGS / "tiny.yaml")
    assert missing.exit_code == 2 and "not found" in missing.stderr


def test_unavailable_device_is_a_clear_error(cli):
    for device in ("cuda", "mps", "tpu"):
        if device == "cuda" and torch.cuda.is_available():
            continue
        result = cli("generate", "hi", "--device", device, "--config", CONFIGS / "tiny.yaml", "--max-new-tokens", "1")
        assert result.exit_code == 2
        assert device in result.stderr and len(result.stderr.strip().splitlines()) <= 2  # warning + error


def test_usage_errors_are_one_line_exit_2(cli):
    for args in (["generate", "hi", "--max-new-tokens", "-1"], ["loss", "--eval-iter", "zero"], ["nosuchcommand"]):
        result = cli(*args)
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_set_override_reaches_the_model(cli):
    result = cli("generate", "hi", "--config", CONFIGS / "tiny.yaml", "--set", "model.n_layers=1",
                 "--max-new-tokens", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["samples"][0]["new_tokens"] == 2

"""Evaluation: the book's loss over loaders, perplexity, bits per byte, per-token views, whole runs."""

import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_config
from gptcli import evaluate as ev
from gptcli.checkpoint import save_checkpoint, step_dir_name
from gptcli.config import Config, ModelConfig
from gptcli.data import load_splits, split_text
from gptcli.errors import InputError, RunError
from gptcli.model import GPTModel, export_state_dict
from test_generate import one_thread  # noqa: F401 (an autouse fixture)


def save_model_checkpoint(run_dir: Path, cfg: Config, step: int, seed: int) -> Path:
    """A step checkpoint of a freshly initialised model (torch.manual_seed(seed))."""
    torch.manual_seed(seed)
    model = GPTModel(cfg.model)
    return save_checkpoint(run_dir, step_dir_name(step), export_state_dict(model), cfg, meta={"step": step})


def uniform_model(cfg: ModelConfig) -> GPTModel:
    """A model whose logits are all 0: every token has probability 1 / vocab_size."""
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.out_head.weight.zero_()
    return model


def test_bits_per_byte_and_perplexity_by_hand():
    # 2 ln 2 nats = 2 bits per token; 3 tokens = 6 bits over 4 bytes.
    # default rel=1e-6: float64 arithmetic on exact inputs, only rounding of log(2)
    assert ev.bits_per_byte(2 * math.log(2), 3, 4) == pytest.approx(1.5)
    assert ev.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert ev.perplexity(1e6) == math.inf


def test_bits_per_byte_of_a_uniform_model_on_a_known_text(tmp_path):
    # " the" is one token of 4 bytes; a uniform model spends log2(50257) bits on each.
    (tmp_path / "the.txt").write_text(" the" * 150, encoding="utf-8")
    model = uniform_model(tiny_model_config(context_length=16))
    datasets = ev.eval_datasets(Config(model=model.cfg), [tmp_path / "the.txt"], val=False)
    (row,) = ev.evaluate_datasets(model, datasets, batch_size=4)
    # Windows start every 16 tokens while a full window + target fits: 9 windows, 144 targets.
    assert (row["tokens"], row["bytes"], row["batches"]) == (144, 576, 3)
    # a uniform model: float32 log-softmax of equal logits is ln(V) to float32 rounding (~1e-7 relative)
    assert row["loss"] == pytest.approx(math.log(50257), rel=1e-6)
    assert row["ppl"] == pytest.approx(50257, rel=1e-5)
    assert row["bpb"] == pytest.approx(math.log2(50257) / 4, rel=1e-6)


def test_validation_row_equals_the_books_calc_loss_loader(tiny_config, verdict, tiktoken_offline):
    from llms_from_scratch.ch02 import create_dataloader_v1
    from llms_from_scratch.ch05 import calc_loss_loader

    torch.manual_seed(5)
    model = GPTModel(tiny_config.model).eval()
    ctx = tiny_config.model.context_length
    (row,) = ev.evaluate_datasets(model, ev.eval_datasets(tiny_config), batch_size=3)
    _, val_text = split_text(verdict.read_text(encoding="utf-8"), tiny_config.data.train_ratio)
    loader = create_dataloader_v1(val_text, batch_size=3, max_length=ctx, stride=ctx, shuffle=False, drop_last=False)
    # same model and batches, the book's loop vs ours: only the float32 batch losses' summation differs
    assert row["loss"] == pytest.approx(calc_loss_loader(loader, model, "cpu"), rel=1e-6)
    assert row["ppl"] == pytest.approx(math.exp(row["loss"]))
    assert row["dataset"] == "val (the-verdict.txt)"
    splits = load_splits(tiny_config.data, ctx)
    assert row["tokens"] == len(splits.val) * ctx


def test_files_are_windowed_and_bad_files_are_input_errors(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Every effort moves you", encoding="utf-8")  # 4 tokens < one window of 32
    windows = ev.file_windows(short, 32)
    assert len(windows) == 1 and windows[0][0].tolist() == [6109, 3626, 6100]
    (tmp_path / "one.txt").write_text("Hello", encoding="utf-8")
    with pytest.raises(InputError, match="one.txt: 1 token"):
        ev.file_windows(tmp_path / "one.txt", 32)
    with pytest.raises(InputError, match="missing.txt: data file not found"):
        ev.eval_datasets(Config(), [tmp_path / "missing.txt"], val=False)


def test_token_report_scores_long_text_window_by_window():
    torch.manual_seed(0)
    model = GPTModel(tiny_model_config(context_length=8)).eval()
    text = "It had always been his fate to have women say such things of him: the fact should be set down"
    ids = ev.encode(text)
    assert len(ids) > 17  # three windows
    report = ev.token_report(model, text)
    assert [t["id"] for t in report["tokens"]] == ids
    with torch.no_grad():
        for start in (0, 8, 16):
            window = torch.tensor([ids[start : start + 8]])
            probs = torch.softmax(model(window)[0], dim=-1)
            for i, target in enumerate(ids[start + 1 : start + 9]):
                # log_softmax().exp() vs softmax() in float32: a few ulps of the probability
                assert report["tokens"][start + i + 1]["prob"] == pytest.approx(probs[i, target].item(), rel=1e-5)
    with pytest.raises(InputError, match="at least two tokens"):
        ev.token_report(model, "Hi")


def test_evaluate_run_goes_through_the_steps_and_skips_a_damaged_checkpoint(tiny_config, tmp_path):
    run = tmp_path / "run"
    paths = [save_model_checkpoint(run, tiny_config, step, seed=step) for step in (10, 20, 30)]
    (paths[1] / "model.safetensors").write_bytes(b"not the weights")  # size and hash no longer match
    report = ev.evaluate_run(run, num_batches=2)
    assert [(r["step"], r["checkpoint"]) for r in report["results"]] == [(10, "step-000010"), (30, "step-000030")]
    assert len(report["skipped"]) == 1 and "step-000020" in report["skipped"][0]
    torch.manual_seed(30)
    model = GPTModel(tiny_config.model).eval()
    (expected,) = ev.evaluate_datasets(model, ev.eval_datasets(tiny_config), tiny_config.train.batch_size, 2)
    # the same weights loaded from a checkpoint, same batches: float32 rounding of the averaged losses at most
    assert report["results"][1]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert report["results"][0]["loss"] != report["results"][1]["loss"]
    # One checkpoint directory is a run of one.
    assert [r["step"] for r in ev.evaluate_run(paths[2], num_batches=1)["results"]] == [30]


def test_evaluate_run_without_checkpoints_is_a_run_error(tiny_config, tmp_path):
    with pytest.raises(RunError, match="nowhere: no such checkpoint or run directory"):
        ev.evaluate_run(tmp_path / "nowhere")
    path = save_model_checkpoint(tmp_path / "run", tiny_config, 5, seed=0)
    (path / "manifest.json").unlink()
    with pytest.raises(RunError, match="no complete checkpoint"):
        ev.evaluate_run(tmp_path / "run")

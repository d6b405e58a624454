"""Numbers gptcli prints are numbers it computed: no silent NaN, no MFU above 100 %."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import CONFIGS
from gptcli import perf
from gptcli.config import load_config
from gptcli.data import TokenWindows, make_loader
from gptcli.errors import InputError
from gptcli.evaluate import evaluate_loss
from gptcli.model import GPTModel
from gptcli.train import Events, train


# ---------------------------------------------------------------- a batch larger than a split (issue 12 finding 8)


def test_loss_with_a_batch_larger_than_the_training_split_exits_2_naming_split_tokens_and_batch(cli, verdict):
    """issue 12 finding 8: `loss --batch-size 1000` printed a train row `nan nan 0 0` and exit 0."""
    result = cli("loss", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--batch-size", "1000")
    assert result.exit_code == 2, result.stdout
    assert "nan" not in result.stdout
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: train split: 144 window(s) (4612 tokens)") and "batch size 1000" in line, line


def test_eval_with_a_batch_larger_than_a_split_scores_the_whole_split_as_one_batch(cli, verdict):
    """issue 12 finding 8: eval keeps its partial last batch, so a large batch evaluates with what there is."""
    result = cli("eval", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--no-val", "--batch-size", "1000",
                 "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    assert rows and all(math.isfinite(r["loss"]) and r["batches"] == 1 and r["tokens"] > 0 for r in rows)


def test_train_with_a_batch_larger_than_the_training_split_exits_2_naming_split_tokens_and_batch(cli, verdict, tmp_path):
    """issue 12 finding 8: training refuses before its first step (and its evaluations never see an empty loader)."""
    result = cli("train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--out", tmp_path / "run",
                 "--batch-size", "1000")
    assert result.exit_code == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "training split has 144 window(s) (4612 tokens)" in line and "batch_size 1000" in line, line
    assert not (tmp_path / "run").exists()


def test_evaluation_never_averages_zero_batches_into_nan():
    """issue 12 finding 8: the book's train loader drops its partial batch; fewer windows than a batch is an error."""
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / "tiny.yaml").model
    model = GPTModel(cfg)
    windows = TokenWindows(torch.arange(5 * cfg.context_length + 1) % 100, cfg.context_length, cfg.context_length)
    with pytest.raises(InputError, match=r"^train split: 5 window\(s\) \(161 tokens\), fewer than one batch of 8"):
        evaluate_loss(model, make_loader(windows, 8, True, True), torch.device("cpu"), split="train")
    kept = evaluate_loss(model, make_loader(windows, 8, False, False), torch.device("cpu"), split="val")
    assert kept["batches"] == 1 and kept["tokens"] == 5 * cfg.context_length and math.isfinite(kept["loss"])


# ---------------------------------------------------------------- MFU never above 100 % (issue 12 finding 16)


def test_peak_cache_is_keyed_by_the_processor_model_and_its_matmul_extensions():
    """issue 12 finding 16: a key of device type and threads only served another CPU model's (or a busy) figure."""
    key = perf.device_key(torch.device("cpu"), torch.float32)
    assert key.startswith(f"cpu|{perf.cpu_model()}|threads{torch.get_num_threads()}|") and key.endswith("|float32")
    assert perf.cpu_model().split("+")[0] not in ("", "cpu")


def test_peak_cache_tells_apart_cpus_that_share_a_model_name_and_flags(tmp_path):
    """Two VMs both reported "AMD EPYC" with AVX512-BF16: a Zen 4 (bf16 peak 419 GFLOP/s on 2 cores) and a
    Zen 5 (780). Keyed by name and flags alone, a home directory shared by both served one's peak to the other
    (and the cache only goes up, so the Zen 4 would never correct a Zen 5 figure)."""
    flags = "fpu sse avx2 fma avx512f avx512_bf16 hypervisor"
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n" \
            "model name\t: AMD   EPYC\nflags\t\t: " + flags + "\n\n"
    zen4, zen5, arm = tmp_path / "zen4", tmp_path / "zen5", tmp_path / "arm"
    zen4.write_text("".join(block.format(n=n, family=25, model=17) for n in range(2)))
    zen5.write_text("".join(block.format(n=n, family=26, model=2) for n in range(2)))
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n\n")
    assert perf.cpu_model(str(zen4)) == "AMD EPYC (family 25 model 17)+avx2+fma+avx512f+avx512_bf16"
    assert perf.cpu_model(str(zen5)) == "AMD EPYC (family 26 model 2)+avx2+fma+avx512f+avx512_bf16"
    assert perf.cpu_model(str(arm)).split("+")[0] not in ("", "cpu")  # no model name: the platform's
    assert perf.cpu_model(str(tmp_path / "absent")) not in ("", "cpu")


def test_a_low_cached_peak_is_remeasured_and_corrected_and_mfu_never_exceeds_100_percent(tmp_path, monkeypatch):
    """issue 12 finding 16: a peak cached while the machine was busy gave `MFU 114.0%` on every later run."""
    monkeypatch.setenv("GPTCLI_CACHE_DIR", str(tmp_path))
    cpu, key = torch.device("cpu"), perf.device_key(torch.device("cpu"), torch.float32)
    perf.cache_path().write_text(json.dumps({key: 100e9, "another machine": 1.0}))
    measured = []
    monkeypatch.setattr(perf, "measure_matmul_flops", lambda device, dtype: measured.append(1) or 300e9)
    warnings = []
    meter = perf.MfuMeter(cpu, torch.float32, perf.peak_flops(cpu, torch.float32), warn=warnings.append)
    assert meter(50e9) == 0.5 and not measured  # below the cached peak: no measurement
    assert meter(150e9) == 0.5 and measured == [1]  # above it: measured again (300e9), the cache corrected
    assert json.loads(perf.cache_path().read_text()) == {key: 300e9, "another machine": 1.0}
    assert meter(400e9) is None and measured == [1]  # once per run; then no figure, one warning
    assert meter(500e9) is None and len(warnings) == 1 and "MFU not reported" in warnings[0]
    # a busy re-measurement never lowers the cache
    monkeypatch.setattr(perf, "measure_matmul_flops", lambda device, dtype: 10e9)
    assert perf.remeasure_peak(cpu, torch.float32) == 300e9


def test_training_with_a_low_cached_peak_corrects_it_and_records_no_mfu_above_100_percent(verdict, tmp_path, monkeypatch):
    """issue 12 finding 16: end to end, with a fake cache holding an impossible peak of 1 kFLOP/s."""
    monkeypatch.setenv("GPTCLI_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    key = perf.device_key(torch.device("cpu"), torch.float32)
    perf.cache_path().write_text(json.dumps({key: 1e3}))
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.max_steps": 3, "train.max_new_tokens": 0})
    train(cfg, tmp_path / "run", events=Events())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in records if r["event"] == "train"]
    assert len(mfus) == 3 and all(m is not None and 0 < m <= 1 for m in mfus), mfus
    assert json.loads(perf.cache_path().read_text())[key] > 1e6  # a real measurement replaced it

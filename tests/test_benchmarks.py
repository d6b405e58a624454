"""The speed benchmarks: what they compute from a run, and that they run (toy sizes; real figures by hand)."""

import subprocess
import sys

import pytest

from conftest import ROOT, VERDICT

sys.path.insert(0, str(ROOT / "benchmarks"))
import time_to_loss  # noqa: E402


def test_time_to_loss_counts_tokens_and_training_time_up_to_the_first_evaluation_at_the_target():
    records = [
        {"event": "train", "step": 1, "tokens_seen": 100, "tokens_per_s": 100.0, "elapsed_s": 1.0},
        {"event": "eval", "step": 1, "tokens_seen": 100, "val_loss": 9.0, "elapsed_s": 3.0},
        {"event": "train", "step": 2, "tokens_seen": 200, "tokens_per_s": 50.0, "elapsed_s": 5.0},
        {"event": "train", "step": 3, "tokens_seen": 300, "tokens_per_s": 25.0, "elapsed_s": 9.0},
        {"event": "eval", "step": 3, "tokens_seen": 300, "val_loss": 7.0, "elapsed_s": 11.0},
        {"event": "train", "step": 4, "tokens_seen": 400, "tokens_per_s": 100.0, "elapsed_s": 12.0},
        {"event": "eval", "step": 4, "tokens_seen": 400, "val_loss": 7.5, "elapsed_s": 14.0, "final": True},
    ]
    r = time_to_loss.to_target(records, target=7.2)
    # steps took 1 + 2 + 4 s of training; the evaluations' time counts in wall_s only
    assert (r["tokens"], r["step"], r["train_s"], r["wall_s"]) == (300, 3, 7.0, 11.0)
    assert (r["final_val_loss"], r["best_val_loss"], r["reached"]) == (7.5, 7.0, True)
    assert time_to_loss.to_target(records, target=6.0)["reached"] is False


@pytest.mark.slow  # two `gptcli train` processes: about a minute on a loaded 2-core machine
def test_time_to_loss_skips_a_recipe_gptcli_refuses_and_reports_the_others():
    tiny = ["--set", "model.n_layers=1", "--set", "model.emb_dim=32", "--set", "model.n_heads=2"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/time_to_loss.py"), *tiny, "--max-steps", "2", "--eval-every", "1",
         "--recipes", "fast-adamw", "--recipe", "bogus train.no_such_key=1", "--json"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "bogus: skipped, gptcli refused its config" in done.stderr and "train.no_such_key" in done.stderr
    table = done.stdout.split("\n{")[0]
    assert "fast-adamw" in table and "bogus" not in table


@pytest.mark.slow
def test_train_throughput_measures_nanogpt_and_transformers_beside_gptcli_in_one_run():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--config", "configs/tiny.yaml",
         "--fast-config", "configs/tiny.yaml", "--fast-set", "model.impl=fused", "--data", str(VERDICT),
         "--batch-sizes", "2", "--steps", "1", "--warmup", "1", "--repeats", "1", "--peer-dtype", "fp32"],
        capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[1] for line in done.stdout.splitlines() if line.strip().startswith("2 ")}
    assert rows == {"book", "gptcli", "gptcli-fast", "nanogpt", "transformers"}, done.stdout + done.stderr
    assert "failed" not in done.stdout
    assert "gptcli-fast against nanogpt" in done.stdout and "measured dense matmul peak: fp32" in done.stdout


@pytest.mark.slow
def test_gpu_script_dry_runs_on_the_cpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--dry-run"],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gptcli-fast against nanogpt" in done.stdout and "top kernels of gptcli's step" in done.stdout
    assert done.stdout.count("flex_attention not used on cpu (as expected)") == 2 and "MISMATCH" not in done.stdout

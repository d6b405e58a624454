"""gptcli plan (issue 15 item 4): the memory estimate against real steps, the largest batch that fits.

Measured peaks come from real training steps in a fresh process (gptcli.plan.measure_peak):
on the CPU the growth of its peak RSS over the step, with glibc returning freed buffers of
1 MiB and more at once, so that the figure is what the step holds (see the module's docstring).
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import CONFIGS, gptcli_cmd
from gptcli.config import load_config
from gptcli.errors import InputError, RunError
from gptcli.plan import estimate_memory, measure_peak, plan_run


def _cfg(name: str, verdict, **overrides):
    return load_config(CONFIGS / f"{name}.yaml", {"data.path": str(verdict), "train.device": "cpu", **overrides})


@pytest.mark.parametrize("name, checkpointing, overrides", [
    ("tiny", False, {}),  # book-exact: the plain loss over full logits
    ("quickstart", False, {}),  # the chunked loss (train.loss_chunk auto), as quickstart trains
    ("quickstart", True, {}),
    ("quickstart", False, {"train.loss_chunk": 0}),  # the plain loss on the fused model
    ("quickstart", False, {"train.precision": "bf16", "train.batch_size": 8}),  # bf16 slices, B*T over one slice
    ("quickstart", False, {"data.document_mask": True}),
    ("tiny", False, {"train.optimizer_in_backward": True}),  # one gradient at a time
])
def test_memory_estimate_is_within_15_percent_of_the_measured_peak(verdict, name, checkpointing, overrides):
    """The estimate models the step training runs: its loss (plain or chunked), precision and document mask."""
    cfg = _cfg(name, verdict, **{"train.activation_checkpointing": checkpointing, **overrides})
    estimated = estimate_memory(cfg).peak(checkpointing)
    measured = measure_peak(cfg, cfg.train.batch_size)["peak"]
    print(f"{name} {overrides}: estimated {estimated / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    # the acceptance bound; allocator rounding and small buffers the estimate does not model stay below it
    assert abs(estimated / measured - 1) <= 0.15


def test_with_optimizer_in_backward_the_estimate_holds_one_parameters_gradient(verdict):
    on = estimate_memory(_cfg("tiny", verdict, **{"train.optimizer_in_backward": True}))
    off = estimate_memory(_cfg("tiny", verdict))
    assert off.gradients == off.weights  # every gradient at the optimizer step
    assert on.gradients == 50257 * 32 * 4  # tiny's largest parameter: the embedding (or head), float32
    assert (on.weights, on.optimizer, on.activations) == (off.weights, off.optimizer, off.activations)


def test_largest_batch_that_fits_runs_within_the_limit_and_one_more_does_not(verdict):
    cfg = _cfg("tiny", verdict)
    mem = estimate_memory(cfg, 6)
    # a limit half a window above batch 6's estimate: the answer must be 6, with half a window (~9 MiB)
    # between the limit and each neighbour, more than the estimate's error on this model (~5 MiB)
    limit = mem.peak() + mem.per_window // 2
    # baseline 0: the limit is the step's alone, as the probe measures the growth over its own start
    result = plan_run(cfg, limit, probe_steps=0, verify=True, baseline=0)
    assert result["largest_batch"]["plain"] == 6
    fits, next_one = result["verify"]
    assert (fits["batch"], next_one["batch"]) == (6, 7)
    assert fits["fits"] and fits["peak"] <= limit
    assert not next_one["fits"] and next_one["peak"] > limit


def test_plan_says_before_the_run_that_a_config_will_not_fit_and_trains_nothing(cli, verdict, tmp_path):
    cfg = _cfg("tiny", verdict)
    mem, base = estimate_memory(cfg), measure_peak(cfg, 4, steps=0)["base"]
    # the process's own memory and batch 2's step, with half a window to spare for the baseline's noise
    limit = base + (mem.peak_at(2) + mem.peak_at(3)) // 2
    result = cli("plan", "--config", CONFIGS / "tiny.yaml", "--set", f"data.path={verdict}", "--memory-limit",
                 str(limit), "--probe-steps", "0", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fits"] is False and data["largest_batch"]["plain"] == 2
    assert "will not fit" in result.stderr and "--batch-size" in result.stderr
    assert data["params"] == 3_242_752 and data["data"]["steps"] == data["data"]["steps_per_epoch"] == 36
    assert not (tmp_path / "checkpoints").exists()


def test_plan_times_a_few_real_steps(cli, verdict):
    result = cli("plan", "--config", CONFIGS / "tiny.yaml", "--set", f"data.path={verdict}", "--probe-steps", "1")
    assert result.exit_code == 0, result.stderr
    assert "time per step" in result.stdout and "time of the run" in result.stdout


@pytest.mark.parametrize("limit", ["lots", "-5GB", "0"])
def test_a_memory_limit_that_is_not_a_size_exits_2(cli, limit):
    result = cli("plan", "--memory-limit", limit, "--probe-steps", "0")
    assert result.exit_code == 2 and "--memory-limit" in result.stderr


def test_plan_takes_the_process_own_memory_off_a_cpu_limit_so_its_largest_batch_trains_within_it(
        verdict, tmp_path, subprocess_env):
    """A training process holds Python, PyTorch and the corpus besides the step (about 0.4 GB): a
    "largest batch" for the step alone overshot a 400 MB limit twice over. Now it is taken off the
    limit, and a real training run at the planned batch stays within the limit (evaluation and the
    checkpoint write add a few percent, hence the 10 % allowance)."""
    limit_mb = 700
    plan = subprocess.run([*gptcli_cmd(), "plan", "--config", str(CONFIGS / "tiny.yaml"), "--set",
                           f"data.path={verdict}", "--memory-limit", f"{limit_mb}MB", "--probe-steps", "0", "--json"],
                          capture_output=True, text=True, env=subprocess_env, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    result = json.loads(plan.stdout)
    baseline = result["device_memory"]["process_baseline"]
    assert baseline > 200 * 2**20 and "taken off --memory-limit" in plan.stderr
    cfg = _cfg("tiny", verdict)
    assert result["largest_batch"]["plain"] == estimate_memory(cfg).largest_batch(limit_mb * 2**20 - baseline)
    batch = result["largest_batch"]["plain"]
    train = [*gptcli_cmd(), "train", "--config", str(CONFIGS / "tiny.yaml"), "--data", str(verdict),
             "--batch-size", str(batch), "--max-steps", "2", "--out", str(tmp_path / "run"),
             "--set", "train.host_memory=return"]
    # a fresh parent whose only child is the training process: its children's peak RSS is that process's
    watch = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
             "sys.stderr.buffer.write(r.stderr); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    run = subprocess.run([sys.executable, "-c", watch, *train], capture_output=True, text=True, env=subprocess_env)
    code, peak_kib = map(int, run.stdout.split())
    assert code == 0, run.stderr
    print(f"batch {batch}: training peak {peak_kib / 1024:.0f} MiB against the {limit_mb} MiB limit")
    assert peak_kib * 1024 <= 1.10 * limit_mb * 2**20


def test_verify_on_the_cpu_never_runs_a_step_past_the_hosts_available_memory(verdict):
    """Without --memory-limit the largest batch fills MemAvailable, and --verify's second step (one
    more window) would exceed it: on a CPU nothing stops that process but the kernel's OOM killer,
    which may kill another. It is refused before any probe runs."""
    with pytest.raises(InputError, match="--memory-limit"):
        plan_run(_cfg("tiny", verdict), probe_steps=0, verify=True)


def test_a_probe_killed_by_a_signal_says_so(verdict, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=-9, stdout="", stderr=""))
    with pytest.raises(RunError, match="killed by SIGKILL .out of memory"):
        measure_peak(_cfg("tiny", verdict), 4)


def test_plan_counts_the_tokens_training_sees_when_accumulation_does_not_divide_the_epochs(cli, verdict, tmp_path):
    """70 micro-batches at grad_accum_steps 3: 23 full steps and one of a single micro-batch."""
    sets = ["--set", "train.grad_accum_steps=3", "--set", "train.num_epochs=2"]
    plan = cli("plan", "--config", CONFIGS / "tiny.yaml", "--set", f"data.path={verdict}", *sets, "--probe-steps", "0",
               "--json")
    assert plan.exit_code == 0, plan.stderr
    run = cli("train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, *sets, "--out", tmp_path / "r",
              "--set", "train.eval_freq=1000", "--set", "train.max_new_tokens=0", "--set", "train.save_freq=null", "--json")
    assert run.exit_code == 0, run.stderr
    planned, trained = json.loads(plan.stdout)["data"], json.loads(run.stdout)
    assert planned["steps"] == trained["steps"] == 24
    assert planned["tokens"] == trained["tokens_seen"]

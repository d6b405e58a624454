"""gptcli plan (issue 15 item 4): the memory estimate against real steps, the largest batch that fits.

Measured peaks come from real training steps in a fresh process (gptcli.plan.measure_peak):
on the CPU the growth of its peak RSS over the step, with glibc returning freed buffers of
1 MiB and more at once, so that the figure is what the step holds (see the module's docstring).
"""

from __future__ import annotations

import json

import pytest

from conftest import CONFIGS
from gptcli.config import load_config
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
    result = plan_run(cfg, limit, probe_steps=0, verify=True)
    assert result["largest_batch"]["plain"] == 6
    fits, next_one = result["verify"]
    assert (fits["batch"], next_one["batch"]) == (6, 7)
    assert fits["fits"] and fits["peak"] <= limit
    assert not next_one["fits"] and next_one["peak"] > limit


def test_plan_says_before_the_run_that_a_config_will_not_fit_and_trains_nothing(cli, verdict, tmp_path):
    result = cli("plan", "--config", CONFIGS / "tiny.yaml", "--set", f"data.path={verdict}", "--memory-limit", "60MB",
                 "--probe-steps", "0", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fits"] is False and data["largest_batch"]["plain"] < 4
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

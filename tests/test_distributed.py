"""torchrun on CPU with gloo: 2 processes x batch b train exactly as 1 process x batch 2b, and resume across.

One process with batch 4 is the reference run (6 steps, checkpoints at 3 and 6).
Two processes with batch 2 each (DDP, and FSDP) must end on the same weights;
a checkpoint at step 3 written by one run must continue in the other process
count to the reference's step-6 weights. Dropout is 0, so the runs draw the same
windows in the same order and differ only by float summation order.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptcli.config import load_config
from gptcli.train import train

from conftest import CONFIGS, VERDICT, gptcli_cmd, keep_checkpoints_up_to

STEPS = 6
# eval_iter 3 split over 2 ranks is uneven (2 + 1 batches): FSDP must keep the ranks in step.
SETS = ["model.drop_rate=0", "train.eval_freq=2", "train.eval_iter=3", "train.save_every=3", "train.peak_flops=1e12",
        "train.sample_tokens=0", "train.grad_clip=1.0"]
TOL = 1e-5


def _sets(extra: list[str] = ()) -> list[str]:
    return [a for s in [*SETS, *extra] for a in ("--set", s)]


def _torchrun(args: list[str], env: dict, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = gptcli_cmd()[:1] + ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                              "-m", "gptcli", "train", *args]
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _common(verdict: Path, out: Path, batch_size: int) -> list[str]:
    return ["-c", str(CONFIGS / "tiny.yaml"), "--data", str(verdict), "--out", str(out), "--device", "cpu",
            "--max-steps", str(STEPS), "--batch-size", str(batch_size)]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"step-{step:06d}" / "model.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < TOL, f"weights differ by up to {worst:.3g}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, batch 4, steps 1..6 with checkpoints at 3 and 6 (in-process)."""
    out = tmp_path_factory.mktemp("dist") / "single"
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(VERDICT), "train.device": "cpu",
                                               "train.max_steps": STEPS, "train.batch_size": 4}, SETS)
    train(cfg, out)
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, reference) -> Path:
    out = tmp_path_factory.mktemp("dist") / "ddp"
    _torchrun(_common(VERDICT, out, 2) + _sets(), dict(os.environ, PYTHONUNBUFFERED="1"), out.parent)
    return out


def test_ddp_two_processes_equal_one_process_with_twice_the_batch(reference, ddp_run):
    _assert_same(_weights(reference, STEPS), _weights(ddp_run, STEPS))
    _assert_same(_weights(reference, 3), _weights(ddp_run, 3))
    # Only rank 0 writes: one metrics file, one line per step (not one per process).
    lines = (ddp_run / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "train"' in line for line in lines) == STEPS


def test_checkpoint_of_two_processes_resumes_in_one(reference, ddp_run, tmp_path):
    run = keep_checkpoints_up_to(ddp_run, tmp_path / "resumed", 3)
    cfg = load_config(run / "step-000003" / "config.yaml", {"train.batch_size": 4})
    summary = train(cfg, run, resume=True)
    assert summary["steps"] == STEPS
    _assert_same(_weights(reference, STEPS), _weights(run, STEPS))


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_in_two(reference, tmp_path, subprocess_env):
    run = keep_checkpoints_up_to(reference, tmp_path / "resumed", 3)
    _torchrun(_common(VERDICT, run, 2) + ["--resume"] + _sets(), subprocess_env, tmp_path)
    _assert_same(_weights(reference, STEPS), _weights(run, STEPS))


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_with_twice_the_batch(reference, tmp_path, subprocess_env):
    out = tmp_path / "fsdp"
    _torchrun(_common(VERDICT, out, 2) + _sets(["train.distributed=fsdp"]), subprocess_env, tmp_path)
    _assert_same(_weights(reference, STEPS), _weights(out, STEPS))
    # ... and an FSDP checkpoint continues in one process.
    run = keep_checkpoints_up_to(out, tmp_path / "resumed", 3)
    cfg = load_config(run / "step-000003" / "config.yaml", {"train.batch_size": 4})
    train(cfg, run, resume=True)
    _assert_same(_weights(reference, STEPS), _weights(run, STEPS))

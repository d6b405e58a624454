"""train.precision: auto's choice per device, fp16 with the gradient scaler (overflow, resume), bf16 refusals."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGS, final_weights, run_losses
from gptcli import precision
from gptcli.checkpoint import load_checkpoint
from gptcli.config import load_config
from gptcli.errors import InputError
from gptcli.precision import resolve_precision
from gptcli.train import Events, train
from test_train import _StopAtStep


def test_auto_precision_reads_the_cpus_bf16_units_from_cpuinfo():
    flags = set()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    chosen, note = resolve_precision("auto", torch.device("cpu"))
    assert chosen == ("bf16" if native else "fp32")
    assert note.startswith(f"train.precision auto: {chosen} (")


@pytest.mark.parametrize("feature, chosen", [("amx_bf16", "bf16"), ("avx512_bf16", "bf16"), (None, "fp32")])
def test_auto_precision_on_a_cpu_follows_its_bf16_feature(monkeypatch, feature, chosen):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: feature)
    got, note = resolve_precision("auto", torch.device("cpu"))
    assert got == chosen and (feature or "no bf16 units") in note
    assert resolve_precision("fp32", torch.device("cpu")) == ("fp32", None)  # an explicit choice stays, silently


@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_without_bf16_gets_fp16_from_auto_and_refuses_bf16_by_name(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda)[0] == ("bf16" if bf16 else "fp16")
    if bf16:
        assert resolve_precision("bf16", cuda) == ("bf16", None)
    else:
        with pytest.raises(InputError) as e:
            resolve_precision("bf16", cuda)
        assert str(e.value).startswith("train.precision bf16: Tesla T4 does not compute bf16") and "\n" not in str(e.value)


def _tiny(verdict, **sets):
    values = {"data.path": str(verdict), "train.device": "cpu", "train.max_steps": 12, "train.eval_freq": 4,
              "train.max_new_tokens": 0, "train.peak_flops": 1e12, "model.impl": "fused", "model.drop_rate": 0.0,
              "train.save_freq": None}
    values.update(sets)
    return load_config(CONFIGS / "tiny.yaml", values)


def test_fp16_with_the_scaler_trains_within_noise_of_fp32(verdict, tmp_path):
    evals = {}
    for name in ("fp32", "fp16"):
        train(_tiny(verdict, **{"train.precision": name, "train.learning_rate": 0.005}), tmp_path / name)
        evals[name] = [r[4] for r in run_losses(tmp_path / name) if r[0] == "eval"]
    assert evals["fp16"][-1] < evals["fp16"][0] - 0.5  # it learns: 12 steps at lr 5e-3 take ~1 off the loss
    # fp16 keeps 11 bits (~5e-4 relative rounding); measured within 4e-4 of fp32 here, 0.005 leaves room for other CPUs
    assert all(abs(a - b) < 0.005 for a, b in zip(evals["fp16"], evals["fp32"])), evals


class _Overflow(torch.autograd.Function):
    """Identity forward; infinite gradients backward: what an fp16 gradient overflow looks like."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.inf


def _overflow_at(monkeypatch, calls: set[int]):
    """Make the training loss's gradients overflow at these (1-based) calls of this process."""
    import gptcli.train

    real, count = gptcli.train.training_loss, [0]

    def loss(*args, **kwargs):
        count[0] += 1
        out = real(*args, **kwargs)
        return _Overflow.apply(out) if count[0] in calls else out

    monkeypatch.setattr(gptcli.train, "training_loss", loss)


class _Warnings(Events):
    def __init__(self):
        self.warnings = []

    def warn(self, message):
        self.warnings.append(message)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(verdict, tmp_path, monkeypatch):
    _overflow_at(monkeypatch, {3})
    events = _Warnings()
    run = tmp_path / "run"
    summary = train(_tiny(verdict, **{"train.precision": "fp16", "train.max_steps": 4, "train.save_freq": 1,
                                      "train.keep_last": 4}), run, events=events)
    assert summary["steps"] == 4  # the run went on
    assert [w for w in events.warnings if "overflow" in w] == [
        "step 3: fp16 overflow; update skipped, loss scale lowered to 32768"]
    scales = [r["loss_scale"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    assert scales == [65536.0, 65536.0, 32768.0, 32768.0]
    weights = {s: load_checkpoint(run / f"step-00000{s}").weights for s in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # step 3 changed nothing
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # step 4 did


def test_fp16_nonfinite_loss_is_an_overflow_until_the_scale_is_spent(verdict, tmp_path, monkeypatch):
    """An inf loss under the scaler skips the step; once the scale reached 1 it stops the run as in fp32."""
    from gptcli.errors import RunError

    cfg = _tiny(verdict, **{"train.precision": "fp16", "train.learning_rate": 1e30, "train.max_steps": 40})
    with pytest.raises(RunError, match="non-finite loss"):
        train(cfg, tmp_path / "run")
    scales = [r["loss_scale"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    assert scales[-1] == 1.0 and len(scales) > 10  # 16 halvings from 65536 were skipped steps, not failures


def test_fp16_resume_restores_the_scaler_bit_for_bit(verdict, tmp_path, monkeypatch):
    cfg = _tiny(verdict, **{"train.precision": "fp16", "train.max_steps": 4})
    _overflow_at(monkeypatch, {1})  # the scale halves at step 1: a resume must carry 32768, not start at 65536
    train(cfg, tmp_path / "full")
    _overflow_at(monkeypatch, {1})
    with pytest.raises(Exception) as stopped:
        train(cfg, tmp_path / "stopped", events=_StopAtStep(2))
    assert type(stopped.value).__name__ == "Interrupted"
    assert load_checkpoint(tmp_path / "stopped" / "step-000002", with_train_state=True).train_state["grad_scaler"]["scale"] == 32768.0
    _overflow_at(monkeypatch, set())
    train(cfg, tmp_path / "stopped", resume=True)
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("full", "stopped")}
    assert [r.get("loss_scale") for r in records["stopped"]] == [r.get("loss_scale") for r in records["full"]]
    assert run_losses(tmp_path / "stopped") == run_losses(tmp_path / "full")
    ours, theirs = final_weights(tmp_path / "stopped"), final_weights(tmp_path / "full")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_auto_precision_says_its_choice_in_one_line_on_stderr(cli, verdict, tmp_path):
    r = cli("train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--out", tmp_path / "run", "--max-steps", "1",
            "--set", "train.precision=auto", "--set", "train.max_new_tokens=0", "--set", "train.peak_flops=1e12")
    assert r.exit_code == 0, r.stderr
    chosen = resolve_precision("auto", torch.device("cpu"))[0]
    assert [line for line in r.stderr.splitlines() if "train.precision auto" in line] == [
        resolve_precision("auto", torch.device("cpu"))[1]]  # a choice, said as such (not as a warning)
    assert chosen not in r.stdout  # stdout holds only the result

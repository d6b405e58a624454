"""Training options the README promises, checked through `train(...)` on tiny CPU runs: what each
one changes in the run's files (checkpoints, pointers, weights, optimizer state, metrics)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, VERDICT, assert_equal_up_to_adamw_rounding, final_weights, gptcli_cmd, run_losses
from gptcli.checkpoint import (list_step_checkpoints, load_train_state, pointer_target, step_dir_name,
                               verify_checkpoint)
from gptcli.config import load_config
from gptcli.train import Events, train

LR = 0.001  # tiny.yaml's learning rate


def _cfg(**sets):
    """configs/tiny.yaml on the book's corpus, no dropout (runs differ only where an option acts), no samples."""
    values = {"data.path": str(VERDICT), "train.device": "cpu", "model.drop_rate": 0.0, "train.max_new_tokens": 0,
              "train.save_freq": None}
    values.update({k.replace("__", "."): v for k, v in sets.items()})
    return load_config(CONFIGS / "tiny.yaml", values)


def _records(run: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def _best_step(run: Path) -> int:
    evals = _records(run, "eval")
    return min(evals, key=lambda r: r["val_loss"])["step"]


# ---------------------------------------------------------------- best and keep_last


def test_keep_last_keeps_the_newest_step_checkpoints_and_the_one_best_points_to(tmp_path):
    """A learning rate so high the validation loss jumps about: the best step (5 here) is an old one."""
    run = tmp_path / "run"
    train(_cfg(train__max_steps=8, train__save_freq=1, train__keep_last=2, train__eval_freq=1,
               train__learning_rate=0.5), run)
    best = _best_step(run)
    kept = [p.name for p in list_step_checkpoints(run)]
    assert set(kept) == {step_dir_name(7), step_dir_name(8), step_dir_name(best)}
    assert best < 7  # the case pruning must respect (the run above is seeded: it stays this way)
    assert pointer_target(run / "best").name == step_dir_name(best)
    assert pointer_target(run / "latest").name == step_dir_name(8)
    for name in kept:
        verify_checkpoint(run / name)


def test_best_between_checkpoints_is_its_own_weights_only_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(_cfg(train__max_steps=8, train__save_freq=4, train__keep_last=1, train__eval_freq=1,
               train__learning_rate=0.5), run)
    best = _best_step(run)
    assert best % 4 != 0  # evaluated at a step no step checkpoint holds
    assert [p.name for p in list_step_checkpoints(run)] == [step_dir_name(8)]
    assert pointer_target(run / "best") is None and (run / "best").is_dir()
    manifest = verify_checkpoint(run / "best")
    assert manifest["step"] == best and manifest["reason"] == "best"
    assert not (run / "best" / "train_state.pt").exists()  # weights only: it cannot resume


# ---------------------------------------------------------------- the optimizer


def test_decay_matrices_only_exempts_vectors_from_weight_decay(tmp_path):
    """One step from the same weights with the same gradients: with decay_matrices_only, the matrices
    move exactly as with decay everywhere, and each vector (norm scales, shifts, biases) ends
    lr * weight_decay * its initial value higher -- the decay AdamW no longer applies to it."""
    every = train(_cfg(train__max_steps=1, model__qkv_bias=True), tmp_path / "all")
    matrices = train(_cfg(train__max_steps=1, model__qkv_bias=True, train__decay_matrices_only=True), tmp_path / "mat")
    assert every["steps"] == matrices["steps"] == 1
    a, b = final_weights(tmp_path / "all"), final_weights(tmp_path / "mat")
    wd = 0.1  # tiny.yaml
    vectors = [k for k in a if a[k].dim() < 2]
    assert any(k.endswith("norm1.scale") for k in vectors) and any(k.endswith("W_query.bias") for k in vectors)
    for key in a:
        if a[key].dim() >= 2:
            assert torch.equal(a[key], b[key]), key
        else:
            # A scale starts at 1, shifts and biases at 0 -- except the MLP/out_proj biases, drawn at
            # init: b - a = lr*wd*p0 with p0 ~ b. float32 rounding of O(1) values: 1e-6.
            torch.testing.assert_close(b[key] - a[key], LR * wd * b[key], rtol=0, atol=1e-6, msg=key)
    scales = [k for k in vectors if k.endswith(".scale")]
    assert all(abs((b[k] - a[k]).mean().item() - LR * wd) < 1e-6 for k in scales)  # visibly decayed in `a`


def test_foreach_adamw_ends_on_the_default_kernels_weights(tmp_path):
    train(_cfg(train__max_steps=4), tmp_path / "default")
    train(_cfg(train__max_steps=4, train__optimizer_impl="foreach"), tmp_path / "foreach")
    # The same AdamW arithmetic in multi-tensor kernels: they may round differently, which AdamW
    # amplifies up to 2 lr per step where a gradient nearly cancels (see the helper); nothing more.
    assert_equal_up_to_adamw_rounding(final_weights(tmp_path / "default"), final_weights(tmp_path / "foreach"), LR, 4)
    for ours, theirs in zip(run_losses(tmp_path / "default"), run_losses(tmp_path / "foreach")):
        assert ours[:2] == theirs[:2]
        for x, y in zip(ours[2:5], theirs[2:5]):
            # losses of weights equal up to that rounding: float32 rounding of an O(10) loss
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-4))


def _gradient_seen_by_adamw(run: Path, step: int) -> float:
    """||g|| of the gradient AdamW used at step 1, from its state: exp_avg = (1 - beta1) * g."""
    state = load_train_state(run / step_dir_name(step) / "train_state.pt")["optimizer"]["state"]
    moments = [s["exp_avg"].double() for s in state.values()]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in moments])).item() / (1 - 0.9)


def test_grad_clip_bounds_the_gradient_the_optimizer_uses_and_logs_the_norm_before(tmp_path):
    free = tmp_path / "free"
    train(_cfg(train__max_steps=1, train__save_freq=1, train__grad_clip=1e9), free)  # never reached
    clipped = tmp_path / "clipped"
    train(_cfg(train__max_steps=1, train__save_freq=1, train__grad_clip=0.05), clipped)
    norm = _records(free, "train")[0]["grad_norm"]
    assert norm > 0.05  # so the second run clips
    # clip_grad_norm_ scales by clip / (norm + 1e-6) and sums in float32: 1e-4 covers both
    assert _gradient_seen_by_adamw(free, 1) == pytest.approx(norm, rel=1e-4)
    assert _records(clipped, "train")[0]["grad_norm"] == pytest.approx(norm, rel=1e-6)  # logged before clipping
    assert _gradient_seen_by_adamw(clipped, 1) == pytest.approx(0.05, rel=1e-4)


# ---------------------------------------------------------------- memory and precision


@pytest.mark.parametrize("sets", [{}, {"train__optimizer_impl": "foreach"}, {"train__optimizer_impl": "fused"},
                                  {"train__optimizer": "muon", "train__decay_matrices_only": True}],
                         ids=["default", "foreach", "fused", "muon"])
def test_optimizer_in_backward_gives_the_same_run_bit_for_bit(tmp_path, sets):
    """Each parameter stepped inside backward gets the update a whole-model step gives it (dropout on)."""
    train(_cfg(train__max_steps=4, model__drop_rate=0.1, train__save_freq=4, train__optimizer_in_backward=False,
               **sets), tmp_path / "after")
    started = []

    class Seen(Events):
        def start(self, info):
            started.append(info["optimizer_in_backward"])

    train(_cfg(train__max_steps=4, model__drop_rate=0.1, train__save_freq=4, train__optimizer_in_backward=True,
               **sets), tmp_path / "inside", events=Seen())
    assert started == [True]
    assert run_losses(tmp_path / "after") == run_losses(tmp_path / "inside")
    ours, theirs = final_weights(tmp_path / "after"), final_weights(tmp_path / "inside")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    states = [load_train_state(r / step_dir_name(4) / "train_state.pt") for r in (tmp_path / "after", tmp_path / "inside")]
    for key in ("optimizer", "muon"):
        a, b = (s.get(key) for s in states)
        assert (a is None) == (b is None)
        if a is not None:
            assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
            for k in a["state"]:
                assert a["state"][k].keys() == b["state"][k].keys()
                assert all(torch.equal(a["state"][k][f], b["state"][k][f]) for f in a["state"][k])


def test_optimizer_in_backward_never_holds_two_gradients_and_leaves_none(tmp_path):
    from gptcli.model import GPTModel
    from gptcli.optim import build_optimizer, step_in_backward

    cfg = _cfg()
    model = GPTModel(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    held = []
    step = optimizer.step

    def counting_step():
        held.append(sum(p.grad is not None for p in model.parameters()))
        step()

    optimizer.step = counting_step
    step_in_backward(model.parameters(), optimizer)
    x = torch.randint(cfg.model.vocab_size, (2, cfg.model.context_length))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    assert held == [1] * len(list(model.parameters()))  # one step per parameter, each with only its own gradient
    assert all(p.grad is None for p in model.parameters())
    assert all(len(s) == 3 for s in optimizer.state.values())  # step, exp_avg, exp_avg_sq: every parameter stepped


@pytest.mark.parametrize("sets, key", [({"train__grad_clip": 1.0}, "train.grad_clip"),
                                       ({"train__grad_accum_steps": 2}, "train.grad_accum_steps"),
                                       ({"train__precision": "fp16"}, "train.precision fp16")])
def test_optimizer_in_backward_true_where_it_cannot_apply_is_refused_naming_the_key(tmp_path, sets, key):
    from gptcli.errors import InputError

    with pytest.raises(InputError, match=f"train.optimizer_in_backward=true: cannot apply: {key}"):
        train(_cfg(train__max_steps=1, train__optimizer_in_backward=True, **sets), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched
    train(_cfg(train__max_steps=1, **sets), tmp_path / "default")  # off by default: steps after backward


def test_optimizer_in_backward_may_change_on_resume_and_the_run_stays_exact(tmp_path):
    train(_cfg(train__max_steps=6, model__drop_rate=0.1, train__optimizer_in_backward=False), tmp_path / "whole")
    run = tmp_path / "split"
    train(_cfg(train__max_steps=3, model__drop_rate=0.1, train__optimizer_in_backward=True), run)
    train(_cfg(train__max_steps=6, model__drop_rate=0.1, train__optimizer_in_backward=False), run, resume=True)
    whole, split = final_weights(tmp_path / "whole"), final_weights(run)
    assert all(torch.equal(whole[k], split[k]) for k in whole)



def test_activation_checkpointing_gives_the_same_losses_and_weights(tmp_path):
    train(_cfg(train__max_steps=3, model__drop_rate=0.1), tmp_path / "plain")
    train(_cfg(train__max_steps=3, model__drop_rate=0.1, train__activation_checkpointing=True), tmp_path / "ckpt")
    # Recomputing a block replays its dropout masks and its forward ops: the same numbers, up to
    # float32 rounding of the recomputation (none is expected on CPU; AdamW amplifies any, see the helper).
    assert_equal_up_to_adamw_rounding(final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt"), LR, 3)
    for ours, theirs in zip(run_losses(tmp_path / "plain"), run_losses(tmp_path / "ckpt")):
        assert ours[:2] == theirs[:2]
        for x, y in zip(ours[2:5], theirs[2:5]):
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-5))  # float32 rounding


def test_bf16_on_the_cpu_trains(tmp_path):
    run = tmp_path / "run"
    train(_cfg(train__max_steps=12, train__precision="bf16", train__learning_rate=0.005), run)
    losses = [r["loss"] for r in _records(run, "train")]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    # From about ln(50257) = 10.8 the loss falls by more than bf16's noise in 12 steps at this rate.
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0
    weights = final_weights(run)
    assert all(w.dtype == torch.float32 for w in weights.values())  # autocast: the weights stay float32
    train(_cfg(train__max_steps=1, train__learning_rate=0.005), tmp_path / "fp32")
    assert _records(tmp_path / "fp32", "train")[0]["loss"] != losses[0]  # bf16 was applied, not ignored


# ---------------------------------------------------------------- the schedule across a resume


def test_a_resume_with_a_new_max_steps_follows_the_schedule_of_the_new_total(tmp_path):
    """README (What may change on resume): with lr_schedule cosine, a new max_steps redraws the decay
    over the new total: from the resumed step on, the learning rate is the one a run started with
    that max_steps would have had at that step."""
    cosine = dict(train__lr_schedule="cosine", train__warmup_steps=2, train__min_lr=0.0001)
    run = tmp_path / "run"
    train(_cfg(train__max_steps=4, **cosine), run)
    train(_cfg(train__max_steps=8, **cosine), run, resume=True)
    fresh = tmp_path / "fresh"
    train(_cfg(train__max_steps=8, **cosine), fresh)
    resumed = {r["step"]: r["lr"] for r in _records(run, "train")}
    planned = {r["step"]: r["lr"] for r in _records(fresh, "train")}
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == planned[step], step  # the same float64 formula at the same step
    assert resumed[4] < planned[4]  # before the resume, the shorter schedule had decayed faster
    assert resumed[8] == pytest.approx(planned[8]) and resumed[5] > resumed[8]


# ---------------------------------------------------------------- distributed


@pytest.mark.slow
def test_a_nonfinite_loss_under_ddp_stops_every_rank_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """Two processes (torchrun, gloo): a learning rate of 1e30 makes step 2's loss non-finite on
    both; they stop together (no rank waits in a collective), exit 1, and step-000001 stays."""
    run = tmp_path / "run"
    cmd = [*gptcli_cmd(), "train", "--nproc", "2", "-c", str(CONFIGS / "tiny.yaml"), "--data", str(VERDICT),
           "--out", str(run), "--device", "cpu", "--max-steps", "4", "--batch-size", "2", "--learning-rate", "1e30",
           "--set", "train.save_freq=1", "--set", "train.max_new_tokens=0", "--set", "model.drop_rate=0"]
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "non-finite loss" in line]
    assert lines and "at step 2" in lines[-1] and "step-000001" in lines[-1]
    assert [p.name for p in list_step_checkpoints(run)] == ["step-000001"]
    verify_checkpoint(run / "step-000001")


def test_fsdp_in_one_process_says_it_trains_unsharded(tmp_path):
    """train.distributed fsdp without torchrun cannot shard anything: said in one line, never dropped silently."""
    warnings = []

    class Warnings(Events):
        def warn(self, message):
            warnings.append(message)

    train(_cfg(train__distributed="fsdp", train__max_steps=1, train__peak_flops=1e12), tmp_path / "run",
          events=Warnings())
    assert [w for w in warnings if w.startswith("train.distributed fsdp")] == [
        "train.distributed fsdp: one process has nothing to shard; it trains unsharded (FSDP applies under "
        "torchrun: gptcli train --nproc N)"]

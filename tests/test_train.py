"""gptcli train: book-exact, resumable bit for bit, durable under SIGKILL, honest about failures."""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, VERDICT, assert_equal_up_to_adamw_rounding, book_model, final_weights, gptcli_cmd, run_losses
from gptcli.checkpoint import find_latest, list_step_checkpoints, load_checkpoint, verify_checkpoint
from gptcli.config import load_config
from gptcli.errors import InputError, RunError
from gptcli.train import Events, _lr_at, train

SMALL = {  # small enough for seconds on 2 cores, big enough to have several batches per epoch
    "model.context_length": 64, "model.emb_dim": 64, "model.n_heads": 4, "model.n_layers": 2,
    "train.device": "cpu", "train.save_freq": None,
}


class Recorder(Events):
    def __init__(self):
        self.evals, self.samples, self.logs = [], [], []

    def eval(self, r):
        self.evals.append(r)

    def sample(self, epoch, text):
        self.samples.append(text)

    def log(self, r):
        self.logs.append(r)


@pytest.mark.parametrize("gelu, in_backward", [("exact", False), ("tanh", False), ("exact", True)])
def test_book_exact_equals_train_model_simple(verdict, tiktoken_offline, tmp_path, gelu, in_backward):
    """Every evaluation, every epoch sample and the final weights equal the book's code (also with the
    optimizer stepped inside backward, as configs/gpt2-124m-256.yaml does)."""
    import tiktoken
    from llms_from_scratch.ch02 import create_dataloader_v1
    from llms_from_scratch.ch05 import train_model_simple

    cfg = load_config(None, {**SMALL, "model.gelu": gelu, "train.num_epochs": 2, "data.path": str(verdict),
                             "train.optimizer_in_backward": in_backward})
    text = verdict.read_text(encoding="utf-8")
    split = int(0.90 * len(text))
    # The book's chapter-5 order: seed, loaders, seed, model, optimizer, train.
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(text[:split], batch_size=2, max_length=64, stride=64, drop_last=True, shuffle=True)
    val_loader = create_dataloader_v1(text[split:], batch_size=2, max_length=64, stride=64, drop_last=False, shuffle=False)
    model = book_model(cfg.model, seed=123)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        book_train, book_val, book_tokens = train_model_simple(
            model, train_loader, val_loader, optimizer, "cpu", num_epochs=2, eval_freq=5, eval_iter=5,
            start_context="Every effort moves you", tokenizer=tiktoken.get_encoding("gpt2"))

    events = Recorder()
    summary = train(cfg, tmp_path / "run", events=events)
    # (both lines) the same float32 ops in the same order; 1e-6 allows only for averaging batch losses in float64
    assert events.evals[-1].get("final")  # the final weights' evaluation, which the book does not have
    events.evals = [e for e in events.evals if not e.get("final")]
    assert [e["train_loss"] for e in events.evals] == pytest.approx(book_train, abs=1e-6, rel=0)
    assert [e["val_loss"] for e in events.evals] == pytest.approx(book_val, abs=1e-6, rel=0)
    assert [e["tokens_seen"] for e in events.evals] == book_tokens
    # The book prints its loss lines and one sample line per epoch; ours render the same text.
    book_samples = [line for line in printed.getvalue().splitlines() if not line.startswith("Ep ")]
    assert events.samples == book_samples
    weights = load_file(str(Path(summary["checkpoint"]) / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if not name.endswith(".att.mask"):
            assert torch.equal(weights[name], tensor), name


def _run(args, env, **kwargs):
    return subprocess.run([*gptcli_cmd(), *map(str, args)], env=env, capture_output=True, text=True, **kwargs)


def _train_args(verdict, out, *extra):
    return ["train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--out", out, "--num-epochs", "2",
            "--set", "train.save_freq=3", "--set", "train.eval_freq=4", *extra]


def _start(args, env):
    return subprocess.Popen([*gptcli_cmd(), *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, step: int) -> str:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            return "".join(seen)
    raise AssertionError("training ended before step %d:\n%s" % (step, "".join(seen)))


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_stop_and_resume_is_bit_identical(verdict, tmp_path, subprocess_env, how):
    full = tmp_path / "full"
    reference = _run(_train_args(verdict, full), subprocess_env, timeout=300)
    assert reference.returncode == 0, reference.stderr

    stopped = tmp_path / "stopped"
    proc = _start(_train_args(verdict, stopped), subprocess_env)
    _wait_for_step(proc, 10)  # about halfway through the 18 steps
    proc.send_signal(getattr(signal, how))
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    if how == "SIGINT":
        assert proc.returncode == 130, rest
        assert "--resume" in rest  # says how to continue
    else:
        assert proc.returncode == -signal.SIGKILL
    assert list_step_checkpoints(stopped), "no checkpoint survived the stop"

    resumed = _run(["train", "--out", stopped, "--resume", "--data", verdict], subprocess_env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert run_losses(stopped) == run_losses(full)
    ours, theirs = final_weights(stopped), final_weights(full)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _train_in_child(cfg_dict, run_dir, resume):
    from gptcli.config import config_from_dict
    from gptcli.train import train as run

    run(config_from_dict(cfg_dict, "test"), Path(run_dir), resume=resume)


def test_sigkill_at_random_moments_never_leaves_a_bad_checkpoint(verdict, tmp_path):
    """SIGKILL 24 times at random moments (checkpoints are written every step, so many kills land
    mid-write); after each, every step directory verifies and the newest one loads and resumes."""
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.device": "cpu", "train.num_epochs": 50,
                                              "train.save_freq": 1, "train.keep_last": 2, "train.max_new_tokens": 0,
                                              "train.peak_flops": 1e12})
    run_dir = tmp_path / "run"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["gptcli.train"])
    rng = random.Random(1234)
    steps_seen = []
    for kill in range(24):
        resume = bool(list_step_checkpoints(run_dir))
        child = ctx.Process(target=_train_in_child, args=(cfg.to_dict(), str(run_dir), resume))
        child.start()
        if kill % 4 == 3:
            time.sleep(rng.uniform(0.0, 1.0))  # during start-up or resume
        else:
            # Wait for progress past the last checkpoint, then kill at a random moment: checkpoints
            # are written every step, so many of these land in the middle of a write.
            last = steps_seen[-1] if steps_seen else 0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and child.is_alive():
                newest = list_step_checkpoints(run_dir)
                if newest and int(newest[-1].name.split("-")[1]) > last:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
        child.kill()
        child.join()
        assert child.exitcode == -signal.SIGKILL, f"kill {kill}: the child ended by itself ({child.exitcode})"
        for path in list_step_checkpoints(run_dir):
            verify_checkpoint(path)  # raises if anything visible is half-written
        latest, skipped = find_latest(run_dir)
        if latest is None:
            continue  # killed before the first checkpoint
        assert not skipped
        ckpt = load_checkpoint(latest, with_train_state=True)
        assert ckpt.train_state["step"] == ckpt.manifest["step"]
        steps_seen.append(ckpt.manifest["step"])
        link = run_dir / "latest"
        if link.is_symlink():
            verify_checkpoint(link.resolve())
    assert len(steps_seen) >= 18 and steps_seen == sorted(steps_seen) and steps_seen[-1] >= steps_seen[0] + 12


def test_nonfinite_loss_exits_1_and_keeps_the_last_good_checkpoint(cli, verdict, tmp_path):
    run = tmp_path / "run"
    result = cli("train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--out", run,
                 "--learning-rate", "1e30", "--set", "train.save_freq=1")
    assert result.exit_code == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "non-finite loss" in line and "at step 2" in line and "step-000001" in line
    latest, _ = find_latest(run)
    assert latest.name == "step-000001"
    verify_checkpoint(latest)
    assert [p.name for p in list_step_checkpoints(run)] == ["step-000001"]


def test_metrics_csv_and_plot_agree_and_plot_redraws(cli, verdict, tmp_path):
    import csv

    run = tmp_path / "run"
    result = cli("train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--out", run, "--max-steps", "12", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 4 * 32
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == len(events)
    for e, row in zip(events, rows):
        assert row["event"] == e["event"] and int(row["step"]) == e["step"]
        for key in ("loss", "train_loss", "val_loss", "lr"):
            if e.get(key) is not None:
                # the CSV holds the JSON value's decimal digits: only their float64 parsing
                assert float(row[key]) == pytest.approx(e[key], rel=1e-12)
    evals = [e for e in events if e["event"] == "eval"]
    # The book's cadence (after step 1, then every 5), then the final weights (issue 12 finding 13).
    assert [e["step"] for e in evals] == [1, 6, 11, 12]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, 13))
    assert summary["val_loss"] == evals[-1]["val_loss"]
    plot = run / "losses.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.unlink()
    redraw = cli("plot", run)
    assert redraw.exit_code == 0 and redraw.stdout.strip() == str(plot) and plot.is_file()
    run_manifest = json.loads((run / "run.json").read_text())
    assert run_manifest["corpus"]["sha256"].startswith("b41e41a6") and run_manifest["versions"]["torch"]


def test_bad_inputs_exit_2_and_write_nothing(cli, verdict, tmp_path):
    base = ["train", "--config", CONFIGS / "tiny.yaml", "--data", verdict]
    short = tmp_path / "short.txt"
    short.write_text("A sentence that is long enough for training windows of thirty-two tokens. " * 3)
    r = cli("train", "--config", CONFIGS / "tiny.yaml", "--data", short, "--out", tmp_path / "a")
    assert r.exit_code == 2 and "validation split has" in r.stderr and "needs 33" in r.stderr
    assert not (tmp_path / "a").exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = cli(*base, "--out", blocker / "run")
    assert r.exit_code == 2 and "not writable" in r.stderr

    r = cli(*base, "--out", tmp_path / "nothing", "--resume")
    assert r.exit_code == 2 and "--resume" in r.stderr

    run = tmp_path / "run"
    assert cli(*base, "--out", run, "--max-steps", "2").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    r = cli(*base, "--out", run, "--max-steps", "2")
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before

    r = cli(*base, "--out", run, "--resume", "--set", "model.n_layers=3", "--set", "model.emb_dim=64")
    assert r.exit_code == 2 and "n_layers 2 vs 3" in r.stderr and "emb_dim 32 vs 64" in r.stderr

    r = cli(*base, "--out", run, "--max-steps", "3", "--overwrite")
    assert r.exit_code == 0 and [p.name for p in list_step_checkpoints(run)] == ["step-000003"]


def test_gradient_accumulation_equals_the_big_batch(verdict, tmp_path):
    common = {**SMALL, "model.drop_rate": 0.0, "data.path": str(verdict), "train.max_steps": 3, "train.max_new_tokens": 0}
    big = train(load_config(None, {**common, "train.batch_size": 4}), tmp_path / "big")
    accum = train(load_config(None, {**common, "train.batch_size": 2, "train.grad_accum_steps": 2}), tmp_path / "acc")
    assert big["tokens_seen"] == accum["tokens_seen"] == 3 * 4 * 64
    # issue 12 finding 15: half-batch gradients summed differ from the big batch's by rounding, which AdamW amplifies
    lr = load_config(None, common).train.learning_rate
    assert_equal_up_to_adamw_rounding(final_weights(tmp_path / "big"), final_weights(tmp_path / "acc"), lr, 3)


def test_stop_by_tokens_and_schedule():
    t = load_config(None, sets=["train.lr_schedule=cosine", "train.warmup_steps=10", "train.min_lr=0.0001",
                                "train.learning_rate=0.001"]).train
    lrs = [_lr_at(s, 110, t) for s in range(110)]
    # (these lines) default rel=1e-6: float64 schedule arithmetic against exact decimal values
    assert lrs[0] == pytest.approx(0.0001) and lrs[9] == pytest.approx(0.001)  # linear warmup
    assert lrs[10] == pytest.approx(0.001) and lrs[60] == pytest.approx(0.00055)  # cosine midpoint
    # the last step is one step short of the cosine's end: 1e-6 is that step's share of the decay
    assert lrs[-1] == pytest.approx(0.0001, abs=1e-6) and all(x > 0 for x in lrs)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_max_tokens_stops_the_run(verdict, tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.max_tokens": 1000, "train.max_new_tokens": 0})
    summary = train(cfg, tmp_path / "run")
    assert summary["tokens_seen"] == 1024 and summary["steps"] == 8  # 128 tokens per step, rounded up


def test_deferred_nonfinite_check_skips_the_update_and_stops_at_the_next_check(verdict, tmp_path):
    """On CUDA the check waits for log points (no host sync per step); asked for here on the CPU."""
    run = tmp_path / "run"
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.learning_rate": 1e30},
                      ["train.optimizer_impl=fused", "train.save_freq=1", "train.log_freq=50"])
    with pytest.raises(RunError) as e:
        train(cfg, run, defer_nonfinite_check=True)
    message = str(e.value)
    assert "non-finite loss" in message and "at step 2" in message and "update was skipped" in message
    assert "step-000001" in message
    assert [p.name for p in list_step_checkpoints(run)] == ["step-000001"]
    verify_checkpoint(run / "step-000001")


def test_deferred_nonfinite_check_leaves_no_attribute_on_the_optimizer(verdict, tmp_path):
    """The skip flag reaches the fused AdamW for one step() call only; the optimizer is left as built."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    stepped = set()
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: stepped.add(optimizer))
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.max_steps": 3, "train.max_new_tokens": 0},
                      ["train.optimizer_impl=fused", "train.log_freq=50"])
    try:
        train(cfg, tmp_path / "run", defer_nonfinite_check=True)
    finally:
        handle.remove()
    assert len(stepped) == 1 and not hasattr(stepped.pop(), "found_inf")


def test_deferring_the_nonfinite_check_needs_the_fused_optimizer(verdict, tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.max_steps": 1})
    with pytest.raises(InputError, match="defer_nonfinite_check=True: needs train.optimizer_impl fused"):
        train(cfg, tmp_path / "run", defer_nonfinite_check=True)
    assert not (tmp_path / "run").exists()


def test_compiled_training_matches_eager_and_saves_plain_keys(verdict, tmp_path):
    """train.compile compiles model + loss together; same losses as eager (no dropout), unprefixed weights."""
    sets = {"data.path": str(verdict), "train.device": "cpu", "train.max_steps": 4, "train.save_freq": 4,
            "train.eval_freq": 2, "train.max_new_tokens": 0, "model.drop_rate": 0.0, "model.impl": "fused"}
    runs = {}
    for compiled in (False, True):
        cfg = load_config(CONFIGS / "tiny.yaml", {**sets, "train.compile": compiled})
        train(cfg, tmp_path / str(compiled))
        runs[compiled] = run_losses(tmp_path / str(compiled))
    assert [r[:2] for r in runs[True]] == [r[:2] for r in runs[False]]
    # the step loss of "train" records, the validation loss of "eval" records
    # compiled kernels fuse and reorder float32 ops; 4 AdamW steps of rounding stay far inside 1e-4 of a ~10 loss
    assert all(math.isclose(a[2] or a[4], b[2] or b[4], rel_tol=1e-4) for a, b in zip(runs[True], runs[False]))
    weights = final_weights(tmp_path / "True")
    assert weights.keys() == final_weights(tmp_path / "False").keys()
    assert not any(k.startswith("_orig_mod.") for k in weights)


@pytest.mark.parametrize("policy", ["return", "retain"])
def test_host_memory_policies_apply_and_keep_training_exact(verdict, tmp_path, subprocess_env, policy):
    """train.host_memory changes only where freed memory goes: the run's losses are the default's."""
    runs = {}
    for name in ("default", policy):
        out = tmp_path / name
        done = _run(["train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--out", out, "--max-steps", "4",
                     "--set", f"train.host_memory={name}"], subprocess_env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "not supported" not in done.stderr  # glibc here: the policy was applied
        runs[name] = run_losses(out)
    assert runs[policy] == runs["default"]


_MALLOC_PROBE = """
import ctypes, sys, torch
from gptcli.hostmem import set_host_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] != "default":
    assert set_host_memory(sys.argv[1])
freed = torch.empty(16 << 20, dtype=torch.uint8)
del freed  # glibc raises its mmap threshold to 16 MiB after this free
mapped, kept = [], []
for size in (2 << 20, 64 << 20):
    before = libc.mallinfo2().hblks
    kept.append(torch.empty(size, dtype=torch.uint8))
    mapped.append(libc.mallinfo2().hblks - before)
print(mapped)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="glibc Linux only")
def test_host_memory_policy_decides_which_buffers_get_their_own_mapping(subprocess_env):
    """default: 2 MiB from the heap (after a free raised the threshold), 64 MiB mapped; return: both
    mapped (and so given back when freed); retain: neither (freed memory stays for reuse)."""
    seen = {}
    for policy in ("default", "return", "retain"):
        done = subprocess.run([gptcli_cmd()[0], "-c", _MALLOC_PROBE, policy], env=subprocess_env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        seen[policy] = json.loads(done.stdout)
    assert seen == {"default": [0, 1], "return": [1, 1], "retain": [0, 0]}


class _StopAtStep(Events):
    """Sends this process SIGINT once `step` is logged: the loop saves and raises Interrupted, as on Ctrl-C."""

    def __init__(self, step: int):
        self.step = step

    def log(self, record):
        if record["step"] == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def _resume_overrides(config: Path) -> dict:
    """Each config as it is (impl, dropout, optimizer kernel, precision, schedule, ...) at a tiny shape."""
    data = CONFIGS.parent / "data" / "quickstart.txt" if config.name == "quickstart.yaml" else VERDICT
    return {"model.context_length": 32, "model.emb_dim": 32, "model.n_heads": 4, "model.n_layers": 2,
            "data.path": str(data), "train.device": "cpu", "train.batch_size": 2, "train.max_steps": 4,
            "train.eval_freq": 3, "train.eval_iter": 2, "train.log_freq": 1, "train.save_freq": None,
            "train.max_new_tokens": 0, "train.peak_flops": 1e12}


def _resume_cases() -> list:
    """One case per distinct config once shrunk (the four GPT-2 shapes share their training settings)."""
    cases: dict[str, list[Path]] = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        cases.setdefault(repr(load_config(path, _resume_overrides(path)).to_dict()), []).append(path)
    return [pytest.param(paths[0], id="+".join(p.stem for p in paths),
                         marks=[pytest.mark.slow] if load_config(paths[0]).train.compile else [])
            for paths in cases.values()]


# Every config in configs/ claims (README, "Training") that a resumed run equals an uninterrupted one on CPU at
# the default thread count; torch.compile's (gpt2-124m-fast) compiles for a minute, so it runs with the slow tests.
RESUME_CONFIGS = _resume_cases()


@pytest.mark.parametrize("config", RESUME_CONFIGS, ids=lambda p: p.stem)
def test_every_config_stops_and_resumes_bit_for_bit_on_cpu(verdict, tmp_path, config):
    """issue 12 finding 7: two runs of configs/quickstart.yaml (impl fused, 2 threads) ended on different weights.

    An uninterrupted run and a run stopped by SIGINT mid-epoch at step 2 and resumed end on the same losses
    and the same weights, bit for bit, at the default thread count (which also makes two uninterrupted runs equal).
    """
    cfg = load_config(config, _resume_overrides(config))
    train(cfg, tmp_path / "full")
    with pytest.raises(Exception) as stopped:
        train(cfg, tmp_path / "stopped", events=_StopAtStep(2))
    assert type(stopped.value).__name__ == "Interrupted" and "step-000002" in str(stopped.value)
    train(cfg, tmp_path / "stopped", resume=True)
    assert run_losses(tmp_path / "stopped") == run_losses(tmp_path / "full")
    ours, theirs = final_weights(tmp_path / "stopped"), final_weights(tmp_path / "full")
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def test_train_changes_no_process_wide_allocator_policy_and_says_so(verdict, tmp_path, monkeypatch):
    """issue 13: glibc mallopt ran from inside train(); the program's entry point applies train.host_memory now."""
    import gptcli.train

    calls = []
    monkeypatch.setattr(gptcli.train, "set_host_memory", lambda policy: calls.append(policy) or True)
    monkeypatch.setattr(gptcli.train, "_HOST_MEMORY_APPLIED", None)

    class Warnings(Events):
        def __init__(self):
            self.lines = []

        def warn(self, message):
            self.lines.append(message)

    events = Warnings()
    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.max_steps": 1, "train.max_new_tokens": 0},
                      ["train.host_memory=return"])
    train(cfg, tmp_path / "a", events=events)
    assert calls == [] and any("train.host_memory return: not applied" in w for w in events.lines)
    assert gptcli.train.apply_host_memory("return") is None and calls == ["return"]
    events.lines.clear()
    train(cfg, tmp_path / "b", events=events)  # applied at the entry point: nothing to say
    assert not any("host_memory" in w for w in events.lines)


def test_tf32_is_applied_for_the_run_only():
    """train.tf32 is a scope: the caller's TF32 settings come back after training (and after an error)."""
    from gptcli.train import _tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with pytest.raises(RuntimeError), _tf32(True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            raise RuntimeError("a failing run")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_on_a_device_without_it_is_said_not_ignored(verdict, tmp_path):
    messages = []

    class Warnings(Events):
        def warn(self, message):
            messages.append(message)

    cfg = load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.max_steps": 1, "train.max_new_tokens": 0,
                                              "train.device": "cpu"}, ["train.tf32=true"])
    train(cfg, tmp_path / "run", events=Warnings())
    assert any(m.startswith("train.tf32 true:") and "no effect on cpu" in m for m in messages)

"""On a CUDA device: the GPU paths (bf16 autocast, torch.compile, fused AdamW, NCCL, the KV cache).

Skipped where there is no CUDA device (CI has none); run them by hand on a GPU machine:
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, final_weights, gptcli_cmd, run_losses, tiny_model_config
from gptcli.checkpoint import find_latest, load_checkpoint
from gptcli.config import load_config
from gptcli.generate import generate
from gptcli.model import GPTModel, load_state_dict
from gptcli.train import Events, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _config(verdict: Path, **sets):
    values = {"data.path": str(verdict), "train.device": "cuda", "train.max_steps": 8, "train.save_freq": 4,
              "train.eval_freq": 4, "train.max_new_tokens": 5, "train.peak_flops": 1e15}
    values.update(sets)
    return load_config(CONFIGS / "tiny.yaml", values)


def test_fast_profile_trains_and_saves_plain_unpadded_weights(verdict, tmp_path):
    cfg = _config(verdict, **{"model.impl": "fused", "model.pad_vocab_multiple": 64, "train.precision": "bf16",
                              "train.compile": True, "train.optimizer_impl": "fused"})
    train(cfg, tmp_path / "run")
    losses = [r[2] for r in run_losses(tmp_path / "run") if r[0] == "train"]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    latest, _ = find_latest(tmp_path / "run")
    weights = load_file(str(latest / "model.safetensors"))
    assert not any(k.startswith("_orig_mod.") for k in weights)  # torch.compile's wrapper is not saved
    assert weights["tok_emb.weight"].shape[0] == 50257 and weights["out_head.weight"].shape[0] == 50257
    # The checkpoint loads into a plain (uncompiled) model on the CPU, padded again for the matmuls.
    ckpt = load_checkpoint(latest)
    model = GPTModel(ckpt.config.model)
    load_state_dict(model, ckpt.weights)
    assert model.out_head.weight.shape[0] == 50304


def test_resume_on_cuda_continues_the_run(verdict, tmp_path):
    full = _config(verdict)  # tiny.yaml's dropout 0.1: the CUDA RNG state must resume too
    train(full, tmp_path / "full")
    half = _config(verdict, **{"train.max_steps": 4})
    train(half, tmp_path / "half")
    train(full, tmp_path / "half", resume=True)
    assert run_losses(tmp_path / "half") == run_losses(tmp_path / "full")
    a, b = final_weights(tmp_path / "half"), final_weights(tmp_path / "full")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"weights differ by up to {worst:.3g}"


@pytest.fixture
def no_tf32():
    """Full float32 matmuls for the test (training with impl fused turns TF32 on for the process)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = False
    yield
    matmul.allow_tf32 = before


@pytest.mark.parametrize("impl", ["book", "fused"])
def test_kv_cache_equals_recompute_on_cuda(impl, no_tf32):
    torch.manual_seed(1)
    model = GPTModel(tiny_model_config(vocab_size=2000, context_length=64, impl=impl)).eval().cuda()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 2000, (n,), generator=g).tolist() for n in (10, 3, 17, 10)]
    cached = generate(model, prompts, 300, use_cache=True)
    assert cached == generate(model, prompts, 300, use_cache=False)
    assert all(len(row) == 300 for row in cached)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_compiled_static_decode_equals_the_eager_static_decode_on_cuda(precision, no_tf32):
    from gptcli.generate import lower_precision_for_decoding

    torch.manual_seed(1)
    model = GPTModel(tiny_model_config(vocab_size=2000, context_length=64, impl="fused")).eval().cuda()
    model = lower_precision_for_decoding(model, precision)
    prompts = [[5, 6, 7], list(range(10, 20))]
    eager = generate(model, prompts, 80, static_cache=True)
    assert generate(model, prompts, 80, compile_decode=True) == eager
    if precision == "fp32":
        assert eager == generate(model, prompts, 80)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_torchrun_with_nccl(verdict, tmp_path, subprocess_env, kind):
    cmd = [*gptcli_cmd()[:1], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "gptcli",
           "train", "-c", str(CONFIGS / "tiny.yaml"), "--data", str(verdict), "--out", str(tmp_path / "run"),
           "--device", "cuda", "--max-steps", "4", "--set", f"train.distributed={kind}"]
    result = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert find_latest(tmp_path / "run")[0] is not None


def test_training_uses_tf32_for_the_run_and_restores_the_callers_setting(verdict, tmp_path, no_tf32):
    """issue 13: TF32 was switched on process-wide by train() and never restored; train.tf32 is a scope now."""
    seen = []

    class Probe(Events):  # records TF32 as the loop sees it at each log
        def log(self, record):
            seen.append(torch.backends.cuda.matmul.allow_tf32)

    train(_config(verdict, **{"model.impl": "fused", "train.max_steps": 2}), tmp_path / "run", events=Probe())
    assert seen == [True, True] and not torch.backends.cuda.matmul.allow_tf32


def test_deferred_nonfinite_check_on_cuda_stops_at_the_next_check(verdict, tmp_path):
    """The default on CUDA with the fused AdamW: no host sync per step, the bad step's update skipped."""
    cfg = _config(verdict, **{"train.optimizer_impl": "fused", "train.learning_rate": 1e30, "train.save_freq": 1,
                              "train.log_freq": 50, "train.eval_freq": 50})
    from gptcli.errors import RunError

    with pytest.raises(RunError, match="update was skipped"):
        train(cfg, tmp_path / "run")

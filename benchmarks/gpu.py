"""One prepared GPU check (about 7-9 minutes on an H100/H200): gptcli's fast profile against nanoGPT, flex_attention, our top kernels.

    python benchmarks/gpu.py               # on the lent GPU, from the checkout's root
    python benchmarks/gpu.py --dry-run     # CPU, toy size, one step each: proves the script runs

1. benchmarks/train_throughput.py --device cuda: GPT-2 124M at context 1024 (configs/gpt2-124m.yaml),
   gptcli's fast profile (configs/gpt2-124m-fast.yaml: bf16 autocast, torch.compile, fused AdamW)
   against nanoGPT's unmodified model.py with torch.compile, fused AdamW (its configure_optimizers
   on CUDA), bf16 autocast and TF32, the same batches, each in its own process, same GPU, same run.
   MFU against the measured dense bf16 matmul peak, and against the datasheet's dense bf16 peak.
2. data.document_mask: a compiled training step takes flex_attention (a BlockMask) on CUDA, and its
   loss and gradients equal the eager step's with the explicit SDPA mask, also with activation
   checkpointing (about a minute: 124M's attention shapes, 2 layers).
3. torch.profiler over three steps of gptcli's own training loop (gptcli.train.train with the
   fast profile, after the compile steps): the top kernels by GPU time, so the next fix is the
   largest one.
Needs the test extras (llms-from-scratch for the book's data loader) and ../shared/peers/nanogpt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s: the MFU target is against these.
DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def datasheet_peak(name: str) -> float | None:
    """The datasheet's dense bf16 peak for a GPU name, the most specific entry first; None if unknown."""
    for key in sorted(DATASHEET_BF16, key=len, reverse=True):
        if key in name:
            return DATASHEET_BF16[key]
    return None


def throughput(args, data: Path) -> dict | None:
    """Run train_throughput.py (its table streams to the terminal); its --json results."""
    if args.dry_run:
        cmd = ["--device", "cpu", "--config", "configs/tiny.yaml", "--fast-config", "configs/tiny.yaml",
               "--fast-set", "model.impl=fused", "--batch-sizes", "2", "--steps", "1", "--warmup", "1"]
    else:
        cmd = ["--device", "cuda", "--config", "configs/gpt2-124m.yaml", "--set", "model.impl=book",
               "--fast-config", "configs/gpt2-124m-fast.yaml", "--batch-sizes", str(args.batch_size),
               "--repeat-data", "40", "--steps", str(args.steps), "--warmup", "3", "--peer-compile", "on"]
    cmd = [sys.executable, str(ROOT / "benchmarks/train_throughput.py"), *cmd, "--data", str(data),
           "--variants", "gptcli-fast", "nanogpt", "--repeats", "1", "--json"]
    print("$", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out = done.stdout
    start = out.find("\n{")
    print(out[:start] if start >= 0 else out, flush=True)
    if done.returncode != 0 or start < 0:
        print(f"train_throughput.py failed (exit {done.returncode})", file=sys.stderr)
        return None
    return json.loads(out[start:])


def document_mask_check(args) -> bool:
    """data.document_mask: compiled training steps against the eager explicit-mask (SDPA) step; prints, returns ok."""
    import torch

    import gptcli.model
    from gptcli.config import load_config
    from gptcli.documents import DocumentMasked
    from gptcli.loss import cross_entropy
    from gptcli.tokenizer import END_OF_TEXT_ID

    device = torch.device("cpu" if args.dry_run else "cuda")
    sets = {"model.impl": "fused", "model.drop_rate": 0.0}  # flex_attention has no dropout: never chosen with it
    if not args.dry_run:
        sets["model.n_layers"] = 2  # 124M's attention (12 heads of 64, context 1024), compiled in seconds
    cfg = load_config(ROOT / ("configs/tiny.yaml" if args.dry_run else "configs/gpt2-124m.yaml"), sets).model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size - 1, (4, cfg.context_length + 1), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 8 / cfg.context_length] = END_OF_TEXT_ID  # ~8 documents a window
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    calls, flex = [], gptcli.model.flex_attention

    def counted(*a, **k):  # replayed on every call of a compiled graph
        calls.append(1)
        return flex(*a, **k)

    def step(compiled: bool, checkpointing: bool):
        torch.manual_seed(0)
        model = gptcli.model.GPTModel(cfg).to(device).train()
        model.activation_checkpointing = checkpointing
        masked = DocumentMasked(model, END_OF_TEXT_ID, reset_positions=True)

        def loss_of(a, b):
            return cross_entropy(masked(a), b)

        calls.clear()
        loss = (torch.compile(loss_of) if compiled else loss_of)(x, y)
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()], bool(calls)

    gptcli.model.flex_attention = counted
    ok = True
    try:
        ref_loss, ref_grads, _ = step(compiled=False, checkpointing=False)
        for checkpointing in (False, True):
            what = f"  compiled, activation checkpointing {'on ' if checkpointing else 'off'}:"
            try:
                loss, grads, used = step(compiled=True, checkpointing=checkpointing)
            except Exception as e:  # reported; the script goes on to the profile
                ok = False
                print(f"{what} FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", flush=True)
                continue
            # float32 both (no autocast, no TF32): only the order of the sums differs (flex tiles the
            # softmax, inductor fuses), rounding of ~1e-6 relative; the bounds leave that 100x room.
            worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(grads, ref_grads))
            expected = used == (device.type == "cuda")  # the CPU has no flex_attention backward: SDPA
            good = expected and abs(loss - ref_loss) <= 1e-4 and worst <= 1e-3
            ok &= good
            print(f"{what} flex_attention {'used' if used else 'not used'} on {device.type} "
                  f"({'as expected' if expected else 'NOT as expected'}), loss {loss:.6f} vs {ref_loss:.6f} "
                  f"(|diff| {abs(loss - ref_loss):.1e} <= 1e-4), gradients' worst |diff| {worst:.1e} of their "
                  f"tensor's largest (<= 1e-3): {'ok' if good else 'MISMATCH'}", flush=True)
    finally:
        gptcli.model.flex_attention = flex
    return ok


def profile_our_step(args, data: Path) -> None:
    """torch.profiler over gptcli's training loop: the top kernels of three steps after the compile steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from gptcli.config import load_config
    from gptcli.train import Events, train

    wait = 1 if args.dry_run else 5  # the first steps compile (and recompile once for the eval/train switch)
    active = 1 if args.dry_run else 3
    config = "configs/tiny.yaml" if args.dry_run else "configs/gpt2-124m-fast.yaml"
    overrides = {"data.path": str(data), "train.max_steps": wait + 1 + active, "train.eval_freq": 10**9,
                 "train.max_new_tokens": 0, "train.save_freq": None, "train.log_freq": 1,
                 "train.device": "cpu" if args.dry_run else "cuda"}
    if not args.dry_run:
        overrides["train.batch_size"] = args.batch_size
    cfg = load_config(ROOT / config, overrides, ["model.impl=fused"] if args.dry_run else [])
    on_gpu = not args.dry_run
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=active)) as prof:

        class Step(Events):
            def log(self, record):
                prof.step()

        with tempfile.TemporaryDirectory() as tmp:
            train(cfg, Path(tmp) / "run", events=Step())
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    print(f"\ntop kernels of gptcli's step ({config}, {active} profiled steps, by {key}):")
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=70))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, toy size, one step: check that the script runs")
    p.add_argument("--batch-size", type=int, default=16, help="windows of 1024 tokens per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--skip-profile", action="store_true")
    args = p.parse_args()
    t0 = time.perf_counter()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --dry-run to check the script on a CPU")
    verdict = next(p for p in (ROOT.parent / "shared/data/the-verdict.txt", ROOT / "data/the-verdict.txt") if p.exists())
    # the-verdict holds 4 windows of 1024 tokens: repeat it for enough distinct batches
    data = Path(tempfile.mkdtemp(prefix="gpu-bench-")) / "the-verdict-x40.txt"
    data.write_text(verdict.read_text(encoding="utf-8") * (1 if args.dry_run else 40), encoding="utf-8")

    results = throughput(args, data)
    if results and not args.dry_run:
        from gptcli.config import load_config
        from gptcli.model import flops_per_token

        name = torch.cuda.get_device_name()
        peak = datasheet_peak(name)
        flops = flops_per_token(load_config(ROOT / "configs/gpt2-124m.yaml").model)
        sheet = f"{name}'s datasheet: {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else f"{name}: no datasheet peak known"
        print(f"MFU of 124M at context 1024 ({sheet}; measured bf16 peak {results['peak_flops_bf16'] / 1e12:.0f} TFLOP/s):")
        for r in results["results"]:
            against_sheet = f", {100 * flops * r['tokens_per_s'] / peak:.1f}% of the datasheet's" if peak else ""
            print(f"  {r['variant']:<12} batch {r['batch']}: {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{100 * r['mfu_bf16_peak']:.1f}% of the measured peak{against_sheet}")
    print("\ndata.document_mask, a training step against the eager one with the explicit SDPA mask:", flush=True)
    document_ok = document_mask_check(args)
    if not args.skip_profile:
        profile_our_step(args, data)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s" + ("" if document_ok else "; the document mask check MISMATCHED"),
          flush=True)


if __name__ == "__main__":
    main()

"""Training throughput and memory: gptcli's loop against the book's, measured in the same run.

    python benchmarks/train_throughput.py                       # reference config, batch 2 and 8, CPU
    python benchmarks/train_throughput.py --batch-sizes 2 --steps 4
    python benchmarks/train_throughput.py --fast-set train.precision=bf16 --peer-dtype bf16   # a CPU with AMX
    python benchmarks/train_throughput.py --device cuda --config configs/gpt2-124m.yaml \\
        --set model.impl=book --fast-config configs/gpt2-124m-fast.yaml --batch-sizes 16 \\
        --repeat-data 40 --steps 20 --warmup 3        # GPU: context 1024, bf16 + compile

Each variant runs in a fresh process (so its peak resident memory is its own):
  book         the book's code: create_dataloader_v1, GPTModel, AdamW, train_model_simple
  gptcli       `gptcli train`'s loop (gptcli.train.train) with the config as given (book-exact), after --set
  gptcli-fast  the same loop with --fast-config (fused kernels, fused AdamW, ...), after --fast-set
  nanogpt      nanoGPT's unmodified model.py (../shared/peers/nanogpt, imported at run time), its
               configure_optimizers and its step: forward + loss under autocast when --peer-dtype bf16, clip 1.0
  transformers GPT2LMHeadModel with SDPA attention and its own loss, the AdamW its Trainer picks
               (fused from torch 2.8), same step as nanogpt's (Trainer's default max_grad_norm is 1.0)
The peers train the --config shape (dropout included) on the book's batches; --peer-dtype auto runs them in
bf16 autocast where this device's bf16 matmuls are clearly faster (AMX/AVX512-BF16 CPUs, GPUs), as their
users would. gptcli and gptcli-fast start from the same seed, so they train the same weights on the same
batches as the book (the peers initialise their own way). Step
times come from the moment each optimizer step ends; the first --warmup steps are dropped, and
the figure is the median over all timed steps of --repeats runs taken in turns.
The device's dense matmul peak is measured in this run too, and MFU = model FLOPs per
token (gptcli.model.flops_per_token: 6N + 12 L T C) x tokens/s / that peak: the peak of each
variant's training dtype, and on a GPU also the dense bf16 peak for every variant.
--repeat-data N trains on the corpus repeated N times (the-verdict holds only 4 windows of 1024).

Needs the test extras (the book's package: pip install --no-deps llms-from-scratch==1.0.19)
and the book's corpus (--data, default ../shared/data/the-verdict.txt or data/the-verdict.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = next((p for p in (ROOT.parent / "shared/data/the-verdict.txt", ROOT / "data/the-verdict.txt") if p.exists()),
                    ROOT / "data/the-verdict.txt")


class _Stop(Exception):
    pass


def _offline_tiktoken() -> None:
    """Let the book's code call tiktoken.get_encoding("gpt2") offline (cache pre-filled with the verified files)."""
    from gptcli.tokenizer import bpe_files

    cache = Path(tempfile.mkdtemp(prefix="tiktoken-"))
    urls = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")
    for url, path in zip(urls, bpe_files()):
        shutil.copy(path, cache / hashlib.sha1(url.encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


def _config(path: str, batch_size: int, steps: int, data: str, device: str, sets: list[str] = ()):
    from gptcli.config import load_config

    return load_config(path, {
        "train.batch_size": batch_size, "train.max_steps": steps, "train.device": device, "data.path": data,
        "train.eval_freq": 10**9, "train.max_new_tokens": 0, "train.save_freq": None, "train.log_freq": 1,
        "train.num_epochs": 10**6,
    }, sets)


def _sets(args) -> list[str]:
    """The overrides a worker applies: --set for all but the fast variant, whose config is complete but --fast-set."""
    return args.fast_set if args.worker == "gptcli-fast" else args.set


def _book_loaders(args):
    """The config, device and the book's train/val loaders: every worker but gptcli's trains on these batches."""
    import torch
    from llms_from_scratch.ch02 import create_dataloader_v1

    from gptcli.device import resolve_device

    _offline_tiktoken()
    cfg = _config(args.config, args.batch_size, args.steps, args.data, args.device, _sets(args))
    m, t = cfg.model, cfg.train
    text = Path(args.data).read_text(encoding="utf-8")
    split = int(cfg.data.train_ratio * len(text))
    torch.manual_seed(t.seed)
    train_loader = create_dataloader_v1(text[:split], batch_size=t.batch_size, max_length=m.context_length,
                                        stride=m.context_length, drop_last=True, shuffle=True)
    val_loader = create_dataloader_v1(text[split:], batch_size=t.batch_size, max_length=m.context_length,
                                      stride=m.context_length, drop_last=False, shuffle=False)
    torch.manual_seed(t.seed)
    return cfg, resolve_device(t.device), train_loader, val_loader


def worker_book(args) -> list[float]:
    """The book's chapter-5 training code, with a clock on optimizer.step."""
    import tiktoken
    import torch
    from llms_from_scratch.ch04 import GPTModel
    from llms_from_scratch.ch05 import train_model_simple

    cfg, device, train_loader, val_loader = _book_loaders(args)
    m, t = cfg.model, cfg.train
    model = GPTModel({k: getattr(m, k) for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                                                 "drop_rate", "qkv_bias")})
    if m.gelu == "exact":  # the config's GELU, as gptcli's book-exact mode uses it
        for block in model.trf_blocks:
            block.ff.layers[1] = torch.nn.GELU()
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    ends: list[float] = []
    step = optimizer.step

    def timed_step(*a, **k):
        out = step(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        if len(ends) == args.steps:
            raise _Stop
        return out

    optimizer.step = timed_step
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(_Stop):
        train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs=10**6,
                           eval_freq=10**9, eval_iter=t.eval_iter, start_context="Every effort moves you",
                           tokenizer=tiktoken.get_encoding("gpt2"))
    return ends


def _peer_steps(args, device, model, optimizer, loss_of, train_loader) -> list[float]:
    """A peer's training step on the book's batches: micro-step under autocast, clip 1.0, step; clock at each end.

    nanoGPT's train.py and transformers' Trainer both clip the gradient norm at 1.0 and
    run forward + loss under autocast when mixed precision is on (nanoGPT: not on a CPU
    by default; here args.peer_dtype decides, so each peer runs at its best setting).
    """
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.peer_dtype]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
    model.to(device).train()
    if device.type == "cuda":  # nanoGPT's train.py allows TF32 for the float32 matmuls left under autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.peer_compile == "on":  # nanoGPT's train.py default (compile = True); Trainer's torch_compile option
        model = torch.compile(model)
    ends: list[float] = []
    while len(ends) < args.steps:
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            with autocast:
                loss = loss_of(model, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            if len(ends) == args.steps:
                break
    return ends


def worker_nanogpt(args) -> list[float]:
    """nanoGPT's unmodified model.py (from ../shared/peers/nanogpt), its configure_optimizers and its step."""
    peers = ROOT.parent / "shared/peers/nanogpt"
    if not (peers / "model.py").exists():
        raise SystemExit(f"nanoGPT's model.py not found in {peers} (see ../shared/peers/README.md)")
    sys.path.insert(0, str(peers))
    from model import GPT, GPTConfig  # nanoGPT's, imported at benchmark time, never copied

    cfg, device, train_loader, _ = _book_loaders(args)
    m, t = cfg.model, cfg.train
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
        model = GPT(GPTConfig(block_size=m.context_length, vocab_size=m.vocab_size, n_layer=m.n_layers,
                              n_head=m.n_heads, n_embd=m.emb_dim, dropout=m.drop_rate, bias=False))
        optimizer = model.configure_optimizers(t.weight_decay, t.learning_rate, (0.9, 0.999), device.type)
    return _peer_steps(args, device, model, optimizer, lambda model, x, y: model(x, y)[1], train_loader)


def worker_transformers(args) -> list[float]:
    """transformers' GPT2LMHeadModel (SDPA attention) with the AdamW its Trainer picks, on the book's batches."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg, device, train_loader, _ = _book_loaders(args)
    m, t = cfg.model, cfg.train
    config = GPT2Config(vocab_size=m.vocab_size, n_positions=m.context_length, n_embd=m.emb_dim, n_layer=m.n_layers,
                        n_head=m.n_heads, resid_pdrop=m.drop_rate, embd_pdrop=m.drop_rate, attn_pdrop=m.drop_rate,
                        attn_implementation="sdpa")
    model = GPT2LMHeadModel(config)
    if model.config._attn_implementation != "sdpa":
        raise SystemExit(f"transformers chose {model.config._attn_implementation} attention, not sdpa")
    # Trainer's default optim is "adamw_torch_fused" from torch 2.8 on ("adamw_torch", foreach, before);
    # it decays every weight but biases and LayerNorm weights.
    no_decay = [p for n, p in model.named_parameters() if n.endswith(".bias") or ".ln_" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith(".bias") or ".ln_" in n)]
    fused = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.learning_rate,
                                  **({"fused": True} if fused else {"foreach": True}))
    # shift_labels=y: the targets are already shifted (the book's batches), so the model's own loss takes them as given
    return _peer_steps(args, device, model, optimizer,
                       lambda model, x, y: model(input_ids=x, labels=y, shift_labels=y).loss, train_loader)


def worker_gptcli(args) -> list[float]:
    """gptcli's training loop (the function behind `gptcli train`), timed at each logged step."""
    from gptcli.train import Events, apply_host_memory, train

    cfg = _config(args.config, args.batch_size, args.steps, args.data, args.device, _sets(args))
    if note := apply_host_memory(cfg.train.host_memory):  # process-wide: this worker is the program's entry
        print(note, file=sys.stderr)
    ends: list[float] = []

    class Clock(Events):
        def log(self, record):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", events=Clock())
    return ends


def run_worker(variant: str, config: str, batch_size: int, args) -> dict:
    """Run one variant in a fresh process; return its step times and peak resident memory."""
    cmd = [sys.executable, __file__, "--worker", variant, "--config", config, "--batch-size", str(batch_size),
           "--steps", str(args.warmup + args.steps), "--data", str(args.data), "--device", args.device,
           "--peer-dtype", args.peer_dtype, "--peer-compile", args.peer_compile, *(a for s in args.set for a in ("--set", s)),
           *(a for s in args.fast_set for a in ("--fast-set", s))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{variant} at batch {batch_size} failed:\n{done.stderr[-4000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_times(r: dict, warmup: int) -> list[float]:
    """Seconds of each optimizer step after the warm-up steps."""
    ends = r["ends"][warmup - 1:] if warmup > 0 else [r["start"], *r["ends"]]
    return [b - a for a, b in zip(ends, ends[1:])]


def summarize(variant: str, batch_size: int, runs: list[dict], args, flops_token: float, peak: float,
              peak_bf16: float) -> dict:
    """Median step time over all timed steps of all repeats; the largest peak memory of the repeats."""
    times = sorted(t for r in runs for t in step_times(r, args.warmup))
    seconds = times[len(times) // 2]
    tps = batch_size * runs[0]["context_length"] / seconds
    return {"variant": variant, "batch": batch_size, "step_s": seconds, "tokens_per_s": tps,
            "mfu": flops_token * tps / peak, "mfu_bf16_peak": flops_token * tps / peak_bf16,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "peak_gpu_mb": max(r.get("peak_gpu_mb", 0.0) for r in runs),
            "steps": len(times), "min_step_s": times[0], "max_step_s": times[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/gpt2-124m-256.yaml"))
    p.add_argument("--fast-config", default=str(ROOT / "configs/gpt2-124m-256-fast.yaml"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    p.add_argument("--variants", nargs="+", default=["book", "gptcli", "gptcli-fast", "nanogpt", "transformers"],
                   choices=["book", "gptcli", "gptcli-fast", "nanogpt", "transformers"])
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each variant, taken in turns (A B C A B C ...) so drifts in machine speed hit all")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--repeat-data", type=int, default=1, metavar="N", help="train on the corpus repeated N times")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override in --config (the book, gptcli and peer variants), as gptcli train --set")
    p.add_argument("--fast-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override in --fast-config, e.g. train.precision=bf16")
    p.add_argument("--peer-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="nanoGPT's and transformers' step: fp32, or bf16 autocast as their mixed precision runs; "
                        "auto = bf16 where gptcli's train.precision auto picks it (bf16 units: AMX, AVX512-BF16, CUDA)")
    p.add_argument("--peer-compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the peers' models; auto = on a GPU (nanoGPT's default there)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        import resource

        start = time.perf_counter()
        workers = {"book": worker_book, "nanogpt": worker_nanogpt, "transformers": worker_transformers}
        ends = workers.get(args.worker, worker_gptcli)(args)
        from gptcli.config import load_config

        ctx = load_config(args.config, sets=_sets(args)).model.context_length
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        import torch

        gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        print(json.dumps({"start": start, "ends": ends, "context_length": ctx, "peak_rss_mb": rss_kb / 1024,
                          "peak_gpu_mb": gpu_mb}))
        return

    import torch

    from gptcli.config import load_config
    from gptcli.device import resolve_device
    from gptcli.model import flops_per_token
    from gptcli import perf

    device = resolve_device(args.device)
    if args.repeat_data > 1:
        text = Path(args.data).read_text(encoding="utf-8")
        repeated = Path(tempfile.mkdtemp(prefix="bench-data-")) / f"x{args.repeat_data}-{Path(args.data).name}"
        repeated.write_text(text * args.repeat_data, encoding="utf-8")
        args.data = str(repeated)
    base = load_config(args.config, sets=args.set)
    fast = load_config(args.fast_config, sets=args.fast_set)
    on_gpu = device.type == "cuda"
    # Every figure is read against the measured peak of the dtype it computes in: both are measured.
    # remeasure_peak caches the figure, so the gptcli workers' MFU meters find it instead of timing a matmul mid-run.
    peaks = {"fp32": perf.remeasure_peak(device, torch.float32), "bf16": perf.remeasure_peak(device, torch.bfloat16)}
    # One rule for "computes bf16 natively", gptcli's own (train.precision auto: CUDA with bf16, a CPU
    # with AMX or AVX512-BF16), for the fast profile and for the peers' best setting alike.
    from gptcli.precision import resolve_precision

    native = resolve_precision("auto", device)[0]
    if args.peer_compile == "auto":
        args.peer_compile = "on" if on_gpu else "off"
    if args.peer_dtype == "auto":
        args.peer_dtype = "bf16" if native == "bf16" else "fp32"
        print(f"peers run with --peer-dtype {args.peer_dtype} (auto: gptcli's train.precision auto gives {native} "
              "here)", file=sys.stderr)
    fast_dtype = resolve_precision(fast.train.precision, device)[0]
    if fast_dtype == "fp16":
        peaks["fp16"] = perf.remeasure_peak(device, torch.float16)
    peak32, peak_fast, peak_bf16 = peaks["fp32"], peaks[fast_dtype], peaks["bf16"]
    processor = torch.cuda.get_device_name(device) if on_gpu else perf.cpu_model()
    print(f"device {device}: {processor} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    unit, scale = ("TFLOP/s", 1e12) if on_gpu else ("GFLOP/s", 1e9)
    print("measured dense matmul peak: " + ", ".join(f"{k} {v / scale:,.1f} {unit}" for k, v in peaks.items())
          + f"; MFU of each row is against the peak of its dtype (gptcli-fast: {fast_dtype}, peers: {args.peer_dtype}"
          + (", compiled)" if args.peer_compile == "on" else ")"))
    print(f"model: {args.config} {' '.join(args.set)} ({flops_per_token(base.model) / 1e6:,.0f} MFLOP per training "
          f"token); {args.steps} timed steps after {args.warmup} warm-up steps\n")
    memory_key = "peak_gpu_mb" if on_gpu else "peak_rss_mb"
    header = (f"{'batch':>5}  {'variant':<12} {'tokens/s':>10} {'step s':>8} {'(min-max)':>12} {'MFU':>6} "
              + (f"{'MFU bf16pk':>10} " if on_gpu else "")
              + f"{'GPU MB' if on_gpu else 'peak MB':>9} {'speed vs book':>14} {'memory vs book':>15}")
    print(header)
    results = []
    for bs in args.batch_sizes:
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for _ in range(args.repeats):
            for variant in args.variants:
                cfg_path = args.fast_config if variant == "gptcli-fast" else args.config
                run = run_worker(variant, cfg_path, bs, args)
                if run is not None:
                    runs[variant].append(run)
        rows = {}
        for variant in args.variants:
            if not runs[variant]:
                print(f"{bs:>5}  {variant:<12} failed (see above)", flush=True)
                continue
            model_cfg, peak = ((fast.model, peak_fast) if variant == "gptcli-fast" else
                               (base.model, peaks[args.peer_dtype]) if variant in ("nanogpt", "transformers") else
                               (base.model, peak32))
            rows[variant] = summarize(variant, bs, runs[variant], args, flops_per_token(model_cfg), peak, peak_bf16)
            r, ref = rows[variant], rows.get("book")
            speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else ""
            memory = f"{r[memory_key] / ref[memory_key]:.2f}x" if ref else ""
            spread = f"({r['min_step_s']:.3f}-{r['max_step_s']:.3f})" if on_gpu else f"({r['min_step_s']:.2f}-{r['max_step_s']:.2f})"
            step = f"{r['step_s']:>8.4f}" if on_gpu else f"{r['step_s']:>8.2f}"
            print(f"{bs:>5}  {variant:<12} {r['tokens_per_s']:>10,.0f} {step} {spread:>12} {100 * r['mfu']:>5.1f}% "
                  + (f"{100 * r['mfu_bf16_peak']:>9.1f}% " if on_gpu else "")
                  + f"{r[memory_key]:>9,.0f} {speed:>14} {memory:>15}", flush=True)
        fast_row = rows.get("gptcli-fast")
        if fast_row:
            ratios = [f"{v} {fast_row['tokens_per_s'] / rows[v]['tokens_per_s']:.2f}x speed, "
                      f"{fast_row[memory_key] / rows[v][memory_key]:.2f}x memory"
                      for v in ("nanogpt", "transformers", "book") if v in rows]
            if ratios:
                print(f"{bs:>5}  gptcli-fast against " + "; ".join(ratios), flush=True)
        results.extend(rows.values())
    if args.json:
        print(json.dumps({"processor": processor, "peak_flops": peaks, "fast_dtype": fast_dtype,
                          "peer_dtype": args.peer_dtype,
                          "peak_flops_fp32": peak32, "peak_flops_fast": peak_fast, "peak_flops_bf16": peak_bf16,
                          "results": results}, indent=2))


if __name__ == "__main__":
    main()

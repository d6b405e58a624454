"""The book's whole chapter-5 run, twice: the book's own code and `gptcli train`, line by line.

    python benchmarks/book_run.py                      # reference config (exact GELU), 10 epochs
    python benchmarks/book_run.py --gelu tanh          # the run printed in the book
    python benchmarks/book_run.py --fast               # also the fast profile: loss curves side by side

Both run in fresh processes on the CPU from seed 123. The book's side is the chapter's code as
published (create_dataloader_v1, GPTModel, AdamW, train_model_simple) with the config's GELU;
gptcli's side is `gptcli train --config configs/gpt2-124m-256.yaml`. The script prints every
`Ep N (Step S): ...` line and every epoch sample of both, marks any difference, and reports the
wall time of each. With --fast it also trains configs/gpt2-124m-256-fast.yaml and prints its
losses beside the exact run's (they should agree within noise, not to the digit). Takes about
10 minutes per run on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_throughput import DEFAULT_DATA, _offline_tiktoken  # noqa: E402


def book(args) -> None:
    """The book's chapter-5 training code, printing what it prints."""
    import tiktoken
    import torch
    from llms_from_scratch.ch02 import create_dataloader_v1
    from llms_from_scratch.ch04 import GPTModel
    from llms_from_scratch.ch05 import train_model_simple

    _offline_tiktoken()
    cfg = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
           "drop_rate": 0.1, "qkv_bias": False}
    text = Path(args.data).read_text(encoding="utf-8")
    split = int(0.90 * len(text))
    torch.manual_seed(123)
    train_loader = create_dataloader_v1(text[:split], batch_size=2, max_length=256, stride=256, drop_last=True,
                                        shuffle=True, num_workers=0)
    val_loader = create_dataloader_v1(text[split:], batch_size=2, max_length=256, stride=256, drop_last=False,
                                      shuffle=False, num_workers=0)
    torch.manual_seed(123)
    model = GPTModel(cfg)
    if args.gelu == "exact":
        for block in model.trf_blocks:
            block.ff.layers[1] = torch.nn.GELU()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
    train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs=10, eval_freq=5, eval_iter=5,
                       start_context="Every effort moves you", tokenizer=tiktoken.get_encoding("gpt2"))


def run(cmd: list[str]) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    out = done.stdout + done.stderr
    lines = [line for line in out.splitlines() if line.startswith(("Ep ", "Every effort moves you"))]
    return lines, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gelu", choices=["exact", "tanh"], default="exact")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--fast", action="store_true", help="also train the fast profile and compare loss curves")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        book(args)
        return

    book_lines, book_s = run([sys.executable, __file__, "--worker", "--gelu", args.gelu, "--data", args.data])
    with tempfile.TemporaryDirectory() as tmp:
        ours_lines, ours_s = run([sys.executable, "-m", "gptcli", "train", "--config",
                                  str(ROOT / "configs/gpt2-124m-256.yaml"), "--data", args.data, "--out",
                                  f"{tmp}/exact", "--device", "cpu", "--set", f"model.gelu={args.gelu}"])
        fast_events = []
        if args.fast:
            fast_lines, fast_s = run([sys.executable, "-m", "gptcli", "train", "--config",
                                      str(ROOT / "configs/gpt2-124m-256-fast.yaml"), "--data", args.data, "--out",
                                      f"{tmp}/fast", "--device", "cpu", "--set", f"model.gelu={args.gelu}"])
            fast_events = [json.loads(x) for x in (Path(tmp) / "fast/metrics.jsonl").read_text().splitlines()]
    width = max(len(x) for x in book_lines + ours_lines)
    print(f"{'the book (llms_from_scratch ' + args.gelu + ' GELU)':<{width}}   gptcli train (configs/gpt2-124m-256.yaml)")
    same = 0
    for a, b in zip(book_lines, ours_lines):
        mark = "  " if a == b else "!="
        same += a == b
        print(f"{a:<{width}} {mark} {b}")
    n = max(len(book_lines), len(ours_lines))
    print(f"\n{same} of {n} lines identical ({len(book_lines)} from the book, {len(ours_lines)} from gptcli); "
          f"wall time: book {book_s:.0f} s, gptcli {ours_s:.0f} s (whole processes, {ours_s / book_s:.2f}x)")
    if args.fast:
        exact = [line for line in ours_lines if line.startswith("Ep ")]
        fast = [e for e in fast_events if e["event"] == "eval"]
        print(f"\nfast profile (configs/gpt2-124m-256-fast.yaml): {fast_s:.0f} s, "
              f"{book_s / fast_s:.2f}x the book's speed; losses beside the exact run:")
        print(f"{'step':>5} {'exact train':>12} {'fast train':>11} {'exact val':>10} {'fast val':>9}")
        for line, e in zip(exact, fast):
            tr, va = (float(x.split()[-1].rstrip(",")) for x in line.split(": ")[1].split(", "))
            print(f"{e['step'] - 1:>5} {tr:>12.3f} {e['train_loss']:>11.3f} {va:>10.3f} {e['val_loss']:>9.3f}")
    sys.exit(0 if same == n else 1)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

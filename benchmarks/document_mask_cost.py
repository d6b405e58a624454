"""Training-step cost of document-aware attention (data.document_mask) on the CPU.

    python benchmarks/document_mask_cost.py                          # a 6-layer 384-wide model, context 256
    python benchmarks/document_mask_cost.py --set model.context_length=1024 --batch 2

Times forward + backward + AdamW steps of the same model on the same windows
(random ids with an <|endoftext|> every `--doc-tokens` tokens on average) with
masking off (the book's causal path, or SDPA's is_causal for impl fused) and on
(a block-causal boolean mask through SDPA, position ids restarting per
document). Variants run interleaved, `--repeats` times each; the median step
time is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gptcli.config import load_config  # noqa: E402
from gptcli.documents import DocumentMasked  # noqa: E402
from gptcli.loss import cross_entropy  # noqa: E402
from gptcli.model import GPTModel  # noqa: E402
from gptcli.tokenizer import END_OF_TEXT_ID  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--doc-tokens", type=int, default=100, help="mean document length in tokens")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    base = ["model.emb_dim=384", "model.n_layers=6", "model.n_heads=6", "model.context_length=256"]
    rows = []
    for impl, drop in (("book", 0.1), ("fused", 0.0)):
        cfg = load_config(None, sets=base + [f"model.impl={impl}", f"model.drop_rate={drop}"] + args.set).model
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, 50000, (args.batch, cfg.context_length + 1), generator=g)
        idx[torch.rand(idx.shape, generator=g) < 1 / args.doc_tokens] = END_OF_TEXT_ID
        inputs, targets = idx[:, :-1], idx[:, 1:]
        times = {"off": [], "on": []}
        torch.manual_seed(0)
        model = GPTModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        callers = {"off": model, "on": DocumentMasked(model, END_OF_TEXT_ID, reset_positions=True)}
        for r in range(args.repeats + 1):  # the first round warms up
            for name, call in callers.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    cross_entropy(call(inputs), targets).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if r:
                    times[name].append((time.perf_counter() - t0) / args.steps)
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        rows.append((impl, drop, cfg.context_length, off, on))
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, documents of ~{args.doc_tokens} tokens")
    print(f"{'impl':6} {'drop':>5} {'T':>5} {'off s/step':>11} {'on s/step':>10} {'cost':>7}")
    for impl, drop, t, off, on in rows:
        print(f"{impl:6} {drop:5.2f} {t:5d} {off:11.3f} {on:10.3f} {100 * (on / off - 1):+6.0f} %")


if __name__ == "__main__":
    main()

"""Items per second of multiple-choice task evaluation: `gptcli eval --task` vs lm-evaluation-harness's hf model.

Both score the same generated 4-choice task with the same weights: a gptcli checkpoint
(random init of a config's shape, default GPT-2 124M) and its `gptcli export` to Hugging
Face format, which lm-eval loads with its `hf` model type. Two figures per side:

- scoring: the log-likelihood requests alone, in this process (gptcli's score_items vs
  HFLM.loglikelihood on the same (context, continuation) pairs), so start-up is excluded;
- command: the whole command as a user runs it, in a fresh process (gptcli eval --task
  vs lm-eval run --model hf over a local YAML task), start-up and model load included.

    python benchmarks/task_eval.py                                 # 124M shape, 200 items
    python benchmarks/task_eval.py --config configs/tiny.yaml --items 20 --skip-command   # a quick look

Needs the test extras (lm-eval[hf], transformers). No network: the task is written locally.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "gray", "brown"]


def write_task(folder: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        context = (f"Item {i}. The old house at the end of the road had been painted many times, and "
                   f"the neighbours still argued about which colour suited it best; this year it was")
        choices = [WORDS[(i + k) % len(WORDS)] + (" with white trim" if k == i % 3 else "") for k in range(4)]
        rows.append({"context": context, "choices": choices, "answer": i % 4})
    data = folder / "bench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "tasks").mkdir()
    (folder / "tasks" / "gptcli_bench.yaml").write_text(
        f"task: gptcli_bench\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n"
        "  - metric: acc_norm\n", encoding="utf-8")
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "gpt2-124m.yaml"))
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size (rows per forward pass)")
    p.add_argument("--skip-command", action="store_true", help="only the in-process scoring figures")
    args = p.parse_args()

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from gptcli.checkpoint import save_checkpoint, step_dir_name
    from gptcli.config import load_config
    from gptcli.model import GPTModel, export_state_dict
    from gptcli.tasks import load_task, score_items, item_requests
    from gptcli.weights import export_hf

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="gptcli-task-bench-"))
    cfg = load_config(args.config, {"train.device": args.device, "model.drop_rate": 0.0})
    torch.manual_seed(0)
    model = GPTModel(cfg.model)
    ckpt = save_checkpoint(work / "run", step_dir_name(1), export_state_dict(model), cfg, meta={"step": 1})
    export_hf(ckpt, work / "hf")
    data = write_task(work, args.items)
    task = load_task("choices", data)
    device = torch.device(args.device)
    model = model.to(device).eval()

    # The same rows per forward pass as lm-eval's --batch_size: batch_tokens counts padded tokens, and
    # these rows are far shorter than the context (a context-sized budget would put hundreds in one pass).
    from gptcli.tokenizer import encode

    longest = max(len(encode(c + x)) for c, x in item_requests(task.items))
    batch_tokens = args.batch_size * longest
    hf = HFLM(pretrained=str(work / "hf"), device=args.device, batch_size=args.batch_size, dtype="float32")
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(item_requests(task.items))]
    # Each side scores a few items first (allocator and thread pool warm), then all of them timed.
    score_items(model, task.items[:8], device, batch_tokens=batch_tokens)
    hf.loglikelihood(requests[:32], disable_tqdm=True)
    t0 = time.perf_counter()
    ours = score_items(model, task.items, device, batch_tokens=batch_tokens)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = hf.loglikelihood(requests, disable_tqdm=True)
    t_hf = time.perf_counter() - t0
    diff = max(abs(a - b[0]) for a, b in zip((x for row in ours for x in row), theirs))
    print(f"{cfg.model.n_layers} layers x {cfg.model.emb_dim}, {args.items} items x 4 choices on {args.device} "
          f"(torch threads {torch.get_num_threads()})")
    print(f"scoring  gptcli {args.items / t_ours:8.1f} items/s   lm-eval hf {args.items / t_hf:8.1f} items/s   "
          f"ratio {t_hf / t_ours:.2f}x   largest log-likelihood difference {diff:.2e}")
    if args.skip_command:
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1"}
    runs = {
        "gptcli": [sys.executable, "-m", "gptcli", "eval", str(ckpt), "--task", "choices", "--task-data", str(data),
                   "--device", args.device, "--json"],
        "lm-eval hf": [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                       f"pretrained={work / 'hf'},dtype=float32", "--tasks", "gptcli_bench", "--include_path",
                       str(work / "tasks"), "--device", args.device, "--batch_size", str(args.batch_size)],
    }
    wall = {}
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
        wall[name] = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{name} failed ({r.returncode}): {r.stderr[-2000:]}")
    print(f"command  gptcli {args.items / wall['gptcli']:8.1f} items/s   lm-eval hf "
          f"{args.items / wall['lm-eval hf']:8.1f} items/s   (whole commands: {wall['gptcli']:.1f} s vs "
          f"{wall['lm-eval hf']:.1f} s)")


if __name__ == "__main__":
    main()

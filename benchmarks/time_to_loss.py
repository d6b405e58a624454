"""Time and tokens to a target validation loss: the book's recipe against gptcli's fast profile, same corpus.

    python benchmarks/time_to_loss.py                          # 3 recipes, seed 123, quickstart corpus
    python benchmarks/time_to_loss.py --seeds 123 124 125 --target 6.0
    python benchmarks/time_to_loss.py --recipe "muon-lr02 train.optimizer=muon train.learning_rate=0.02"
    python benchmarks/time_to_loss.py --max-steps 20 --eval-every 5 --recipes book fast-adamw   # a quick look

Every recipe is a list of `gptcli train --set` overrides on top of --config (default
configs/quickstart.yaml: a 4-layer, 128-wide model on data/quickstart.txt, the corpus gptcli
ships, trained on the CPU in minutes). Built in:

  book        the book's chapter-5 recipe on that model: its arithmetic (model.impl=book), dropout 0.1,
              AdamW lr 4e-4 constant, weight decay 0.1 on every tensor, no warm-up, no clipping
  fast-adamw  quickstart.yaml as shipped (fused kernels, cosine schedule with warm-up, clip 1.0, no decay
              on biases and norms) with the fast profile's CPU settings: fused AdamW, host_memory retain
  fast-muon   fast-adamw with train.optimizer=muon (torch.optim.Muon on the blocks' matrices)

A recipe whose config gptcli refuses (exit code 2, e.g. a key this checkout does not have yet)
is skipped with its one-line error on stderr; the others still run.

Each (recipe, seed) is one `python -m gptcli train` process (so process-wide settings such as
the malloc policy stay its own), evaluated every --eval-every steps on the whole validation
split (train.eval_iter: null), the same cadence for all. Read from its metrics.jsonl:
  tokens     training tokens seen at the first evaluation whose val_loss <= target
  train s    training time to that step: the sum of step times (tokens / tokens_per_s of each
             logged step; evaluations, checkpoints and samples excluded)
  wall s     elapsed_s of that evaluation (what a user waits, evaluations and checkpoints included)
  final      val_loss of the last evaluation, and the best one
The target is --target, or else the highest best-val_loss of all runs, i.e. the lowest loss every run reached
(said on stderr). Resolution: one evaluation interval; a run that never reaches the target says so.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {
    "book": ["model.impl=book", "model.drop_rate=0.1", "train.learning_rate=0.0004", "train.lr_schedule=constant",
             "train.warmup_steps=0", "train.min_lr=0.0", "train.grad_clip=null", "train.decay_matrices_only=false"],
    "fast-adamw": ["train.optimizer_impl=fused", "train.host_memory=retain"],
    "fast-muon": ["train.optimizer_impl=fused", "train.host_memory=retain", "train.optimizer=muon"],
}


def parse_recipe(spec: str) -> tuple[str, list[str]]:
    """'NAME KEY=VALUE KEY=VALUE ...' (shell quoting allowed) -> (NAME, [KEY=VALUE, ...])."""
    words = shlex.split(spec)
    if not words or "=" in words[0] or not all("=" in w for w in words[1:]):
        raise SystemExit(f"--recipe {spec!r}: expected 'NAME KEY=VALUE ...'")
    return words[0], words[1:]


def run_recipe(name: str, sets: list[str], seed: int, args, out: Path) -> dict | None:
    """Train one recipe from one seed with the CLI; its metrics records, or None when gptcli refused its config."""
    common = [f"train.seed={seed}", f"train.eval_freq={args.eval_every}", "train.eval_iter=null",
              "train.max_new_tokens=0", "train.log_freq=1", f"train.save_freq={10**9}", "train.keep_last=1",
              f"train.device={args.device}"]
    if args.max_steps:
        common.append(f"train.max_steps={args.max_steps}")
    common += args.set
    cmd = [sys.executable, "-m", "gptcli", "train", "--config", args.config, "--out", str(out),
           *(a for s in [*common, *sets] for a in ("--set", s))]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode == 2:
        lines = done.stderr.strip().splitlines()
        print(f"{name}: skipped, gptcli refused its config: {lines[-1] if lines else '(no message)'}", file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"{name} (seed {seed}) failed, exit {done.returncode}:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return {"recipe": name, "seed": seed, "records": records}


def to_target(records: list[dict], target: float) -> dict:
    """Tokens, training seconds and wall seconds at the first evaluation with val_loss <= target; final losses."""
    evals = [r for r in records if r["event"] == "eval"]
    train_s, step_end_s = 0.0, {}
    last_tokens = 0
    for r in (r for r in records if r["event"] == "train"):
        train_s += (r["tokens_seen"] - last_tokens) / r["tokens_per_s"]  # log_freq=1: this step's own time
        last_tokens = r["tokens_seen"]
        step_end_s[r["step"]] = train_s
    hit = next((e for e in evals if e["val_loss"] <= target), None)
    return {"final_val_loss": evals[-1]["val_loss"] if evals else None,
            "best_val_loss": min((e["val_loss"] for e in evals), default=None),
            "steps": max(step_end_s, default=0), "train_s_total": train_s,
            "reached": hit is not None,
            "tokens": hit["tokens_seen"] if hit else None, "step": hit["step"] if hit else None,
            "train_s": step_end_s.get(hit["step"]) if hit else None, "wall_s": hit["elapsed_s"] if hit else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help=f"built-in recipes to run: {', '.join(RECIPES)}")
    p.add_argument("--recipe", action="append", default=[], metavar="'NAME KEY=VALUE ...'",
                   help="one more recipe: a name and its --set overrides (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override in --config for every recipe (before the recipe's own), as gptcli train --set")
    p.add_argument("--seeds", type=int, nargs="+", default=[123])
    p.add_argument("--target", type=float, help="validation loss to reach (default: the lowest every run reached)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between evaluations (the time resolution)")
    p.add_argument("--max-steps", type=int, help="stop every run here (default: the config's epochs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args()
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipes: unknown {', '.join(unknown)} (built in: {', '.join(RECIPES)}; add one with --recipe)")
    recipes = {name: RECIPES[name] for name in args.recipes}
    recipes.update(parse_recipe(spec) for spec in args.recipe)

    from gptcli.perf import cpu_model

    runs = []
    with tempfile.TemporaryDirectory(prefix="time-to-loss-") as tmp:
        for seed in args.seeds:  # seeds outside, recipes inside: a drift in machine speed hits every recipe
            for name, sets in recipes.items():
                if any(r["recipe"] == name and r.get("skipped") for r in runs):
                    continue
                print(f"training {name} (seed {seed}) ...", file=sys.stderr, flush=True)
                run = run_recipe(name, sets, seed, args, Path(tmp) / f"{name}-{seed}")
                runs.append(run or {"recipe": name, "seed": seed, "skipped": True})
    done = [r for r in runs if not r.get("skipped")]
    if not done:
        raise SystemExit("no recipe ran")
    target = args.target
    if target is None:
        target = max(min(e["val_loss"] for e in r["records"] if e["event"] == "eval") for r in done)
        print(f"target val_loss {target:.4f}: the lowest loss every run reached (no --target given)", file=sys.stderr)
    for r in done:
        r.update(to_target(r.pop("records"), target))

    print(f"{args.config}, device {args.device}: {cpu_model() if args.device == 'cpu' else args.device}; "
          f"target val_loss {target:.4f}, evaluated every {args.eval_every} steps on the whole validation split")
    print(f"{'recipe':<14} {'seed':>5} {'tokens':>9} {'train s':>8} {'wall s':>8} {'final':>7} {'best':>7} {'steps':>6}")
    for r in done:
        reached = (f"{r['tokens']:>9,} {r['train_s']:>8.1f} {r['wall_s']:>8.1f}" if r["reached"]
                   else f"{'not reached':>27}")
        print(f"{r['recipe']:<14} {r['seed']:>5} {reached} {r['final_val_loss']:>7.3f} {r['best_val_loss']:>7.3f} "
              f"{r['steps']:>6}")
    if len(args.seeds) > 1:
        print("\nmedian over seeds (runs that reached the target):")
        for name in recipes:
            hits = [r for r in done if r["recipe"] == name and r["reached"]]
            if hits:
                print(f"{name:<14} {len(hits)}/{len(args.seeds)} reached; tokens "
                      f"{statistics.median(r['tokens'] for r in hits):,.0f}, train s "
                      f"{statistics.median(r['train_s'] for r in hits):.1f}, final val_loss "
                      f"{statistics.median(r['final_val_loss'] for r in done if r['recipe'] == name):.3f}")
    if args.json:
        print(json.dumps({"target": target, "processor": cpu_model(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

"""Training throughput with all three experiment trackers on (train.loggers) against none, same run.

    python benchmarks/logger_cost.py                                  # configs/tiny.yaml, 40 steps
    python benchmarks/logger_cost.py --config configs/quickstart.yaml --steps 100 --repeats 3

Trains the same config with `train.loggers: []` and `[tensorboard, wandb, mlflow]`, interleaved
`--repeats` times each, into fresh run directories. Reports the median of the loop's own per-log
tokens/s (metrics.jsonl, first log interval left out: it holds the warm-up), the same over the
second half of the run (the trackers are open by then: their start-up overlaps the first steps) and the wall time of
each run (which includes opening the trackers: MLflow's first SQLite store takes seconds, on a
background thread). W&B runs offline unless WANDB_MODE or credentials say otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gptcli.config import LOGGERS, load_config  # noqa: E402
from gptcli.train import Events, train  # noqa: E402


class _Quiet(Events):
    def __init__(self):
        self.warnings = []

    def warn(self, message):
        self.warnings.append(message)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "the-verdict.txt"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")  # a benchmark uploads nothing unless asked to
    # epochs unbounded: --steps decides the length (tiny.yaml alone is one epoch of a few dozen steps)
    overrides = {"data.path": args.data, "train.max_steps": args.steps, "train.num_epochs": 10**6, "train.save_freq": None}
    variants = {"none": [], "all three": list(LOGGERS)}
    rates: dict[str, list[float]] = {v: [] for v in variants}
    later: dict[str, list[float]] = {v: [] for v in variants}  # second half: the trackers are open by then
    walls: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        # untimed: the first run in a process pays one-off costs (imports, the peak-FLOPs probe's cache)
        train(load_config(args.config, {**overrides, "train.max_steps": 2}, args.set), Path(tmp) / "warm-up",
              events=_Quiet())
        for r in range(args.repeats):
            for name, loggers in variants.items():
                cfg = load_config(args.config, overrides, [*args.set, f"train.loggers={json.dumps(loggers)}"])
                run = Path(tmp) / f"{name.replace(' ', '-')}-{r}"
                events = _Quiet()
                t0 = time.perf_counter()
                train(cfg, run, events=events)
                walls[name].append(time.perf_counter() - t0)
                logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                rate = [e["tokens_per_s"] for e in logs if e["event"] == "train"]
                rates[name] += rate[1:]
                later[name] += rate[len(rate) // 2:]
                dropped = [w for w in events.warnings if "dropped" in w]
                if dropped:
                    print(f"warning: {dropped[0]}", file=sys.stderr)
    print(f"{'loggers':<10} {'median tokens/s':>16} {'second half':>12} {'wall s (median)':>16}")
    for name in variants:
        print(f"{name:<10} {statistics.median(rates[name]):>16,.0f} {statistics.median(later[name]):>12,.0f} "
              f"{statistics.median(walls[name]):>16.1f}")
    for what, d in (("whole run", rates), ("second half", later)):
        print(f"all three / none, {what}: {statistics.median(d['all three']) / statistics.median(d['none']):.3f}")


if __name__ == "__main__":
    main()

"""Peak memory and throughput of `gptcli prepare` on a Parquet file against the same documents as JSON Lines.

    python benchmarks/prepare_parquet.py --mb 1000          # the issue's 1 GB file
    python benchmarks/prepare_parquet.py --mb 20            # a smoke run

Generates one Parquet file of about `--mb` MB of English-like documents (words
drawn from the book's corpus, 0.5-20 KB each, row groups of `--row-group`
rows, snappy-compressed as FineWeb's files are), written a row group at a time,
and the same documents as one JSON Lines file (today's text path). Then runs
`gptcli prepare` on each in its own child process and reports wall time,
tokens/s and the child's peak resident memory (``wait4``'s ru_maxrss).
Acceptance (issue 16): the Parquet run peaks under 500 MB and its tokens/s is
within 10 % of the JSON Lines run; both must write the same tokens (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_throughput import ROOT, VERDICT, run_child  # noqa: E402


def make_files(root: Path, megabytes: float, row_group: int, seed: int = 0) -> tuple[Path, Path, int]:
    """Write docs.parquet and docs.jsonl holding the same documents; return their paths and the count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = VERDICT.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    target, written, count = int(megabytes * 1e6), 0, 0
    root.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(root / "docs.parquet", schema, compression="snappy") as writer, \
            open(root / "docs.jsonl", "w", encoding="utf-8") as jsonl:
        while written < target:
            texts = [" ".join(rng.choices(words, k=rng.randint(80, 3300))) for _ in range(row_group)]
            ids = list(range(count, count + len(texts)))
            writer.write_table(pa.table({"id": ids, "text": texts}, schema=schema))
            jsonl.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts))
            written += sum(len(t) for t in texts)
            count += len(texts)
    return root / "docs.parquet", root / "docs.jsonl", count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=1000.0, help="text in the Parquet file, MB (default 1000)")
    parser.add_argument("--row-group", type=int, default=10_000, help="rows per Parquet row group (default 10,000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer threads (default: CPUs)")
    parser.add_argument("--tmp", type=Path, default=None, help="scratch directory (default: the system's)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each input, in the order J P P J ... so drift favours neither (default 2)")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)  # the child that writes the files
    args = parser.parse_args()
    if args.generate:
        print(make_files(args.generate, args.mb, args.row_group)[2])
        return

    scratch = Path(tempfile.mkdtemp(prefix="gptcli-parquet-bench-", dir=args.tmp))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        t0 = time.perf_counter()
        # In a child: a forked child's ru_maxrss counts the parent's pages until exec, so the
        # generated tables must never be in this process.
        out, _, _, _ = run_child([sys.executable, __file__, "--generate", str(scratch / "in"), "--mb", str(args.mb),
                                  "--row-group", str(args.row_group)], env)
        parquet, jsonl, documents = scratch / "in" / "docs.parquet", scratch / "in" / "docs.jsonl", int(out)
        print(f"generated {documents:,} documents: Parquet {parquet.stat().st_size / 1e6:,.0f} MB, "
              f"JSON Lines {jsonl.stat().st_size / 1e6:,.0f} MB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        runs: dict[str, list] = {"jsonl": [], "parquet": []}
        order = [("jsonl", jsonl), ("parquet", parquet)]
        for r in range(args.repeats):
            for name, path in order if r % 2 == 0 else order[::-1]:
                out, wall, cpu, peak = run_child([sys.executable, "-m", "gptcli", "prepare", str(path), "--out",
                                                  str(scratch / name), "--workers", str(args.workers), "--json"], env)
                summary = json.loads(out)
                runs[name].append((summary["train_tokens"] + summary["val_tokens"], wall, cpu, peak, path.stat().st_size))
                print(f"run {r + 1} {name}: {wall:.1f} s, {cpu:.1f} CPU s, peak {peak:,.0f} MB", file=sys.stderr)
                shutil.rmtree(scratch / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    counts = {run[0] for name in runs for run in runs[name]}
    if len(counts) != 1:
        sys.exit(f"token counts differ: JSON Lines {[r[0] for r in runs['jsonl']]}, Parquet {[r[0] for r in runs['parquet']]}")
    tokens = counts.pop()
    # each input's median run by wall time (with 2 repeats: the mean of the two)
    runs = {name: tuple(statistics.median(r[i] for r in rs) for i in range(5)) for name, rs in runs.items()}
    print(f"{documents:,} documents, {tokens:,} tokens; {os.cpu_count()} CPUs, --workers {args.workers}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"medians of {args.repeats} runs each")
    print(f"{'input':10} {'file MB':>8} {'seconds':>8} {'tokens/s':>12} {'CPU s':>7} {'peak RSS':>10}")
    for name, (_, wall, cpu, peak, size) in runs.items():
        print(f"{name:10} {size / 1e6:8,.0f} {wall:8.1f} {tokens / wall:12,.0f} {cpu:7.1f} {peak:8,.0f} MB")
    ratio = runs["jsonl"][1] / runs["parquet"][1]
    print(f"Parquet/JSON Lines tokens/s: {100 * ratio:.0f} % (target >= 90 %); "
          f"Parquet peak memory {runs['parquet'][3]:,.0f} MB (target < 500 MB)")


if __name__ == "__main__":
    main()

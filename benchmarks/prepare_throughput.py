"""Throughput and peak memory of `gptcli prepare` against tiktoken's own encode_ordinary_batch.

    python benchmarks/prepare_throughput.py                 # 200 MB corpus, threads = CPUs
    python benchmarks/prepare_throughput.py --mb 5          # a smoke run

A corpus of English-like text (words drawn from the book's corpus, so the BPE
sees real words) is generated once: half as JSON Lines files of 0.5-20 KB
records, half as .txt files of 50-500 KB. Then, each in its own child process:

1. `gptcli prepare CORPUS --workers N` end to end: reading, hashing, splitting,
   tokenizing, writing shards and the index (interpreter start-up included);
2. the reference: the same documents already in memory (loading not timed),
   tokenized by ``Encoding.encode_ordinary_batch(docs, num_threads=N)``.

Peak memory is each child's maximum resident set (``wait4``'s ru_maxrss); the
CPU seconds of the prepare process (all threads) show its cost when other work
shares the CPUs and wall-clock ratios get noisy.
Acceptance (issue 6): prepare's peak < 1 GB and its tokens/s >= 80 % of the
reference's. Both count the same tokens (prepare adds one <|endoftext|> per
document, not counted here), which the script checks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERDICT = ROOT.parent / "shared" / "data" / "the-verdict.txt"

REFERENCE = r"""
import json, sys, time
from pathlib import Path
from gptcli.tokenizer import get_tokenizer
corpus, threads = Path(sys.argv[1]), int(sys.argv[2])
docs = []
for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
    if path.suffix == ".jsonl":
        docs += [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]
    else:
        docs.append(path.read_text(encoding="utf-8"))
enc = get_tokenizer()
enc.encode_ordinary_batch(docs[:threads], num_threads=threads)  # warm the thread pool and caches
t0, c0 = time.perf_counter(), time.process_time()
tokens = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=threads)))
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"tokens": tokens, "seconds": seconds, "cpu": cpu, "documents": len(docs)}))
"""


def make_corpus(root: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """Write about `megabytes` MB of text under `root`; return (bytes, files)."""
    words = VERDICT.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    written, files, i = 0, 0, 0
    root.mkdir(parents=True)

    def text(n_bytes: int) -> str:
        out = rng.choices(words, k=max(n_bytes // 6, 1))
        for j in range(0, len(out), rng.randint(40, 120)):  # paragraphs
            out[j] = "\n\n" + out[j]
        return " ".join(out)

    while written < target:
        if i % 2 == 0:  # a JSON Lines file of ~5 MB
            path = root / f"part-{i:04d}.jsonl"
            with path.open("w", encoding="utf-8") as f:
                size = 0
                while size < min(5e6, target - written):
                    line = json.dumps({"id": size, "text": text(rng.randint(500, 20_000))}) + "\n"
                    f.write(line)
                    size += len(line.encode("utf-8"))
        else:  # a folder of .txt documents, ~5 MB
            folder = root / f"books-{i:04d}"
            folder.mkdir()
            size = 0
            while size < min(5e6, target - written):
                data = text(rng.randint(50_000, 500_000)).encode("utf-8")
                (folder / f"{size:09d}.txt").write_bytes(data)
                size += len(data)
                files += 1
        written += size
        files += i % 2 == 0
        i += 1
    return written, files


def run_child(cmd: list[str], env: dict) -> tuple[str, float, float, float]:
    """(stdout, wall seconds, CPU seconds, peak RSS in MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{cmd[:4]}... failed with exit code {proc.returncode}")
    return out, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200.0, help="corpus size in MB (default 200)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="threads for both sides (default: CPUs)")
    parser.add_argument("--corpus", type=Path, help="reuse (or keep) the generated corpus here")
    parser.add_argument("--tmp", type=Path, default=None, help="scratch directory (default: the system's)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="gptcli-prepare-bench-", dir=args.tmp))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        corpus = args.corpus or scratch / "corpus"
        if not corpus.exists():
            t0 = time.perf_counter()
            size, files = make_corpus(corpus, args.mb)
            print(f"generated {size / 1e6:.1f} MB in {files} files in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        size = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())

        out, wall, cpu, peak = run_child([sys.executable, "-m", "gptcli", "prepare", str(corpus), "--out", str(scratch / "out"),
                                     "--workers", str(args.workers), "--json"], env)
        ours = json.loads(out)
        ours_tokens = ours["train_tokens"] + ours["val_tokens"]
        documents = ours["train_documents"] + ours["val_documents"]
        ours_tokens -= documents  # the <|endoftext|> after each document
        out, _, _, ref_peak = run_child([sys.executable, "-c", REFERENCE, str(corpus), str(args.workers)], env)
        ref = json.loads(out)
    finally:
        if args.corpus is None:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            shutil.rmtree(scratch / "out", ignore_errors=True)
    if ours_tokens != ref["tokens"] or documents != ref["documents"]:
        sys.exit(f"token counts differ: prepare {ours_tokens} in {documents} documents, "
                 f"tiktoken {ref['tokens']} in {ref['documents']}")

    rows = [
        (f"gptcli prepare --workers {args.workers} (whole process)", wall, f"{cpu:.1f}", f"{peak:,.0f} MB"),
        ("gptcli prepare, in-process time", ours["elapsed_s"], "", ""),
        (f"tiktoken encode_ordinary_batch(num_threads={args.workers})", ref["seconds"], f"{ref['cpu']:.1f}",
         f"{ref_peak:,.0f} MB"),
    ]
    print(f"corpus: {size / 1e6:.1f} MB, {documents} documents, {ref['tokens']:,} tokens; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':58} {'seconds':>8} {'tokens/s':>12} {'MB/s':>7} {'CPU s':>6} {'peak RSS':>10}")
    for name, seconds, cpu_s, rss in rows:
        print(f"{name:58} {seconds:8.2f} {ref['tokens'] / seconds:12,.0f} {size / 1e6 / seconds:7.2f} {cpu_s:>6} {rss:>10}")
    ratio = ref["seconds"] / wall
    print(f"prepare/tiktoken tokens/s: {100 * ratio:.0f} % whole process, {100 * ref['seconds'] / ours['elapsed_s']:.0f} % "
          f"in-process (target >= 80 %); prepare peak memory {peak:,.0f} MB (target < 1024 MB)")


if __name__ == "__main__":
    main()

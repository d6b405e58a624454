"""The whole chapter-5 run (124M, 10 epochs on the-verdict) against the book's own code.

Slow (about 20 minutes on 2 CPU cores): run with `python -m pytest -m slow`.
"""

import subprocess
import sys

import pytest

from conftest import ROOT, VERDICT


@pytest.mark.slow
def test_reference_run_prints_every_line_of_the_books_run():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "book_run.py"), "--data", str(VERDICT)],
                          capture_output=True, text=True, timeout=3600)
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "28 of 28 lines identical" in done.stdout  # 18 loss lines (every 5 of 90 steps) + 10 samples

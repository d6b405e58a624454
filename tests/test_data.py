"""The book's data pipeline: split by character, sliding windows, shuffled batches; clear errors."""

import hashlib
import http.server
import threading

import pytest
import torch

from gptcli import data
from gptcli.config import DataConfig
from gptcli.errors import InputError, RunError


def test_windows_equal_the_books_dataset(verdict, tiktoken_offline):
    from llms_from_scratch.ch02 import GPTDatasetV1
    import tiktoken

    text = verdict.read_text(encoding="utf-8")
    for max_length, stride in ((256, 256), (64, 32), (4, 1)):
        book = GPTDatasetV1(text, tiktoken.get_encoding("gpt2"), max_length, stride)
        ours = data.TokenWindows(torch.tensor(data.encode(text)), max_length, stride)
        assert len(ours) == len(book)
        for i in (0, 1, len(book) // 2, len(book) - 1):
            x, y = ours[i]
            bx, by = book[i]
            assert torch.equal(x, bx) and torch.equal(y, by)


def test_splits_of_the_verdict_match_the_book(verdict):
    splits = data.load_splits(DataConfig(path=str(verdict)), 256)
    assert splits.sha256 == data.VERDICT_SHA256
    assert splits.train_tokens + splits.val_tokens >= 5145 - 1
    assert (len(splits.train), len(splits.val)) == (18, 2)  # 9 training batches of 2, 1 validation batch


def test_shuffled_batches_follow_the_books_loader(verdict, tiktoken_offline):
    """Same windows in the same order as the book's DataLoader, from the same global RNG state."""
    from llms_from_scratch.ch02 import create_dataloader_v1

    text = verdict.read_text(encoding="utf-8")
    splits = data.load_splits(DataConfig(path=str(verdict)), 64)
    book = create_dataloader_v1(text[: int(0.9 * len(text))], batch_size=2, max_length=64, stride=64)
    ours = data.make_loader(splits.train, 2, shuffle=True, drop_last=True)
    for epoch in range(2):
        torch.manual_seed(epoch)
        book_batches = list(book)
        book_state = torch.get_rng_state()
        torch.manual_seed(epoch)
        our_batches = list(ours)
        assert torch.equal(torch.get_rng_state(), book_state)  # same draws from the global RNG
        assert len(our_batches) == len(book_batches)
        for (x, y), (bx, by) in zip(our_batches, book_batches):
            assert torch.equal(x, bx) and torch.equal(y, by)


def test_sampler_resume_and_rank_slices():
    sampler = data.WindowBatchSampler(10, 2, shuffle=True, drop_last=True)
    torch.manual_seed(3)
    full = list(sampler)
    seed = sampler.seed
    sampler.resume(seed, 4)
    assert list(sampler) == full[2:]
    ranks = [data.WindowBatchSampler(10, 1, True, True, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.resume(seed, 0)
    parts = [list(r) for r in ranks]
    assert [a + b for a, b in zip(*parts)] == full


@pytest.mark.parametrize(
    "content, problem",
    [(b"", "empty"), (b"  \n\n ", "empty"), (b"caf\xe9 latin-1", "not UTF-8"), (b"\x00\xff\xfe binary", "not UTF-8")],
)
def test_bad_corpus_files(tmp_path, content, problem):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=problem) as e:
        data.load_splits(DataConfig(path=str(path)), 32)
    assert str(path) in str(e.value)


def test_missing_and_too_short(tmp_path):
    with pytest.raises(InputError, match="not found"):
        data.load_splits(DataConfig(path=str(tmp_path / "nope.txt")), 32)
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of words here. " * 3)
    with pytest.raises(InputError, match=r"training split has \d+ tokens, one window needs 33"):
        data.load_splits(DataConfig(path=str(short)), 32)
    short.write_text("Enough words for training but a validation split that is far too short. " * 4)
    with pytest.raises(InputError, match=r"validation split has \d+ tokens, one window needs 33"):
        data.load_splits(DataConfig(path=str(short)), 32)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="holds no .txt"):
        data.load_splits(DataConfig(path=str(tmp_path / "empty_dir")), 32)


def test_folder_of_txt_files_is_joined_with_endoftext(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text")
    assert data.read_corpus(tmp_path) == "first<|endoftext|>second"


class _Server:
    """A local HTTP server serving `body` at any path."""

    def __init__(self, body: bytes):
        body_ = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body_)))
                self.end_headers()
                self.wfile.write(body_)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/the-verdict.txt"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_default_corpus_is_downloaded_and_checked(verdict, monkeypatch, tmp_path):
    server = _Server(verdict.read_bytes())
    monkeypatch.setattr(data, "VERDICT_URL", server.url)
    try:
        seen = []
        splits = data.load_splits(DataConfig(), 256, progress=lambda done, total: seen.append((done, total)))
    finally:
        server.close()
    assert (tmp_path / "data" / "the-verdict.txt").read_bytes() == verdict.read_bytes()
    assert splits.sha256 == data.VERDICT_SHA256 and seen[-1] == (20479, 20479)


def test_corrupt_download_is_removed(monkeypatch, tmp_path):
    server = _Server(b"not the verdict" * 100)
    monkeypatch.setattr(data, "VERDICT_URL", server.url)
    try:
        with pytest.raises(RunError, match="sha256"):
            data.load_splits(DataConfig(), 256)
    finally:
        server.close()
    # Nothing is left: neither the bad file nor the data/ folder the download created (issue 12 finding 9).
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())


def test_offline_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "VERDICT_URL", "http://127.0.0.1:9/the-verdict.txt")  # closed port
    with pytest.raises(RunError) as e:
        data.load_splits(DataConfig(), 256)
    assert "data/the-verdict.txt" in str(e.value) and "--data" in str(e.value)


def test_a_failed_corpus_download_exits_1_as_the_readme_table_says(monkeypatch, tmp_path):
    """issue 12 build 8: a network error is a runtime failure (exit 1), as the exit-code table says."""
    from typer.testing import CliRunner

    from gptcli.cli import app

    monkeypatch.setattr(data, "VERDICT_URL", "http://127.0.0.1:9/the-verdict.txt")  # closed port
    result = CliRunner().invoke(app, ["loss", "--eval-iter", "1"])
    assert result.exit_code == 1, (result.output, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "downloading it failed" in last

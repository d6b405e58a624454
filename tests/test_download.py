"""Downloads against a file server on 127.0.0.1 that each test starts: complete, resumed,
interrupted, corrupted and failing transfers, and `gptcli download` speaking the hub's
protocol (a pinned revision, the sha256 on the redirect) and OpenAI's."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gptcli import hub
from gptcli.checkpoint import load_checkpoint
from gptcli.download import download, head
from gptcli.errors import RunError
from gptcli.model import GPTModel, load_state_dict

from conftest import FIXTURES

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FileServer:
    """Serves `files` by path with HEAD, GET, Range, redirects and injected faults; logs each request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str]] = {}  # extra response headers by path
        self.redirects: dict[str, str] = {}  # path -> Location
        self.fail: dict[str, int] = {}  # path -> status
        self.cut: dict[str, int] = {}  # path -> close the connection after this many body bytes (once)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.sent = 0  # body bytes sent
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.files = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self) -> list[tuple[str, str | None]]:
        return [(path, rng) for method, path, rng in self.requests if method == "GET"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        fs: FileServer = self.server.files
        path, rng = self.path, self.headers.get("Range")
        fs.requests.append((self.command, path, rng))
        extra = fs.headers.get(path, {})
        if path in fs.fail:
            self._reply(fs.fail[path], extra, b"")
            return
        if path in fs.redirects:
            self._reply(302, {**extra, "Location": fs.redirects[path]}, b"")
            return
        data = fs.files.get(path)
        if data is None:
            self._reply(404, {}, b"")
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if start >= len(data) and rng:
            self._reply(416, {"Content-Range": f"bytes */{len(data)}"}, b"")
            return
        headers = {**extra, "Content-Length": str(len(data) - start), "Accept-Ranges": "bytes"}
        if rng:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:] if body else b""
        if body and path in fs.cut:
            payload = payload[: fs.cut.pop(path)]
            self.close_connection = True
        self._reply(206 if rng else 200, headers, payload, length_set=True)

    def _reply(self, status: int, headers: dict[str, str], payload: bytes, length_set: bool = False) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if not length_set:
            self.send_header("Content-Length", "0")
        self.end_headers()
        if payload:
            self.wfile.write(payload)
            self.server.files.sent += len(payload)
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    fs = FileServer()
    yield fs
    fs.server.shutdown()
    fs.server.server_close()


DATA = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(DATA).hexdigest()


# ---------------------------------------------------------------- download()


def test_complete_download(server, tmp_path):
    server.files["/f.bin"] = DATA
    seen = []
    dest = download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=SHA, progress=lambda d, t: seen.append((d, t)))
    assert dest.read_bytes() == DATA and not (tmp_path / "f.bin.part").exists()
    assert seen[-1] == (len(DATA), len(DATA))
    download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=SHA)  # already there and verified
    assert len(server.gets()) == 1


def test_partial_download_resumes_with_range(server, tmp_path):
    server.files["/f.bin"] = DATA
    (tmp_path / "f.bin.part").write_bytes(DATA[:300_000])
    download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=SHA, size=len(DATA))
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert server.gets() == [("/f.bin", "bytes=300000-")]
    assert server.sent == len(DATA) - 300_000


def test_interrupted_transfer_keeps_its_part_for_the_next_run(server, tmp_path):
    server.files["/f.bin"] = DATA
    server.cut["/f.bin"] = 123_456
    with pytest.raises(RunError, match="interrupted after 123456 of 1048576 bytes; run again to resume"):
        download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=SHA)
    assert (tmp_path / "f.bin.part").stat().st_size == 123_456
    download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256=SHA)
    assert (tmp_path / "f.bin").read_bytes() == DATA
    assert server.gets()[-1] == ("/f.bin", "bytes=123456-")


def test_hash_mismatch_removes_the_file(server, tmp_path):
    server.files["/f.bin"] = DATA
    with pytest.raises(RunError, match="does not match the expected 0{64}; the file was removed"):
        download(f"{server.url}/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_server_errors_and_silent_servers_are_one_line_failures(server, tmp_path):
    server.fail["/f.bin"] = 500
    with pytest.raises(RunError, match="answered HTTP 500") as e:
        download(f"{server.url}/f.bin", tmp_path / "f.bin")
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        with pytest.raises(RunError, match="cannot connect .*timed out.*offline"):
            head(f"http://127.0.0.1:{silent.getsockname()[1]}/f.bin", timeout=0.5)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(RunError, match="cannot connect .*offline"):
            download(f"http://127.0.0.1:{port}/f.bin", tmp_path / "f.bin")


# ---------------------------------------------------------------- gptcli download


@pytest.fixture
def tiny_hub(server, monkeypatch):
    """The hub's protocol for a tiny GPT-2 'gpt2-tiny': resolve -> 302 with X-Linked-Etag,
    X-Linked-Size and X-Repo-Commit -> the file store (Range-capable)."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4)).eval()
    spec = hub.Pretrained("gpt2-tiny", "tiny", 32, 2, 4, "test-org/gpt2-tiny")
    monkeypatch.setitem(hub.PRETRAINED, spec.name, spec)
    hf_dir = Path("hf-source")
    hf.save_pretrained(hf_dir)
    data = (hf_dir / "model.safetensors").read_bytes()
    store = f"/store/{hashlib.sha256(data).hexdigest()}?signature=1"
    server.files[store] = data
    for rev in ("main", COMMIT):
        path = f"/{spec.hub_repo}/resolve/{rev}/model.safetensors"
        server.redirects[path] = server.url + store
        server.headers[path] = {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                "X-Linked-Size": str(len(data)), "X-Repo-Commit": COMMIT, "ETag": '"abc"'}
    server.hf, server.data, server.store = hf, data, store
    return server


def one_line_error(r, code: int) -> str:
    """The error line: the last line on stderr, after at most the progress lines."""
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and all(x.startswith("downloading ") for x in lines[:-1]), r.stderr
    assert r.stdout == ""
    return lines[-1]


def test_download_from_the_hub_pins_verifies_and_converts(cli, tiny_hub):
    r = cli("download", "gpt2-tiny", "--endpoint", tiny_hub.url)
    assert r.exit_code == 0, r.stderr
    out = Path("checkpoints/pretrained/gpt2-tiny")
    assert r.stdout.strip() == str(out)
    assert not (out / ".download").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pretrained"] == "gpt2-tiny"
    assert manifest["source"]["sha256"] == hashlib.sha256(tiny_hub.data).hexdigest()
    assert manifest["source"]["revision"] == COMMIT
    # The file was fetched at the commit 'main' resolved to, then from the store.
    assert [p for p, _ in tiny_hub.gets()] == [f"/test-org/gpt2-tiny/resolve/{COMMIT}/model.safetensors", tiny_hub.store]
    ckpt = load_checkpoint(out)
    assert (ckpt.config.model.context_length, ckpt.config.model.qkv_bias, ckpt.config.model.gelu) == (1024, True, "tanh")
    model = GPTModel(ckpt.config.model)
    load_state_dict(model, ckpt.weights)
    x = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        # two implementations (our layers vs transformers' GPT-2) summing in other orders: float32 rounding of O(10) logits
        torch.testing.assert_close(model.eval()(x), tiny_hub.hf(x).logits, atol=1e-4, rtol=0)

    r = cli("download", "gpt2-tiny", "--endpoint", tiny_hub.url)
    assert r.exit_code == 0 and "already downloaded" in r.stderr
    assert len(tiny_hub.gets()) == 2  # nothing fetched again


def test_hub_download_resumes_a_partial_file(cli, tiny_hub):
    part = Path("checkpoints/pretrained/gpt2-tiny/.download/model.safetensors.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(tiny_hub.data[:1_000_000])
    r = cli("download", "gpt2-tiny", "--endpoint", tiny_hub.url)
    assert r.exit_code == 0, r.stderr
    assert tiny_hub.gets()[-1] == (tiny_hub.store, "bytes=1000000-")
    assert tiny_hub.sent == len(tiny_hub.data) - 1_000_000


def test_hub_hash_mismatch_deletes_the_download(cli, tiny_hub):
    for headers in tiny_hub.headers.values():
        headers["X-Linked-Etag"] = '"' + hashlib.sha256(b"other bytes").hexdigest() + '"'
    line = one_line_error(cli("download", "gpt2-tiny", "--endpoint", tiny_hub.url), 1)
    assert "does not match" in line and "removed" in line
    leftovers = [p for p in Path("checkpoints/pretrained/gpt2-tiny").rglob("*") if p.is_file()]
    assert leftovers == []


def test_hub_errors_are_one_line_failures(cli, tiny_hub):
    for headers in tiny_hub.headers.values():  # a file the hub keeps in git, not LFS: no sha256
        del headers["X-Linked-Etag"]
    assert "no sha256" in one_line_error(cli("download", "gpt2-tiny", "--endpoint", tiny_hub.url), 1)
    for headers in tiny_hub.headers.values():  # a broken mirror: a size that is no number
        headers["X-Linked-Etag"] = f'"{hashlib.sha256(tiny_hub.data).hexdigest()}"'
        headers["X-Linked-Size"] = "abc"
    assert "size that is not a number ('abc')" in one_line_error(cli("download", "gpt2-tiny", "--endpoint", tiny_hub.url), 1)
    tiny_hub.fail["/test-org/gpt2-tiny/resolve/main/model.safetensors"] = 500
    assert "HTTP 500" in one_line_error(cli("download", "gpt2-tiny", "--endpoint", tiny_hub.url), 1)


def test_download_from_openai_reads_tensorflow_files(cli, server, monkeypatch, tmp_path):
    spec = hub.Pretrained("gpt2-tf-tiny", "tiny", 8, 3, 2, "unused/repo", vocab_size=64, context_length=16)
    monkeypatch.setitem(hub.PRETRAINED, spec.name, spec)
    for name in hub.OPENAI_FILES:
        server.files[f"/models/tiny/{name}"] = (FIXTURES / "openai-tiny" / name).read_bytes()
    server.cut["/models/tiny/model.ckpt.data-00000-of-00001"] = 5000
    r = cli("download", "gpt2-tf-tiny", "--source", "openai", "--endpoint", f"{server.url}/models")
    assert "interrupted after 5000" in one_line_error(r, 1)
    r = cli("download", "gpt2-tf-tiny", "--source", "openai", "--endpoint", f"{server.url}/models")
    assert r.exit_code == 0, r.stderr
    assert ("/models/tiny/model.ckpt.data-00000-of-00001", "bytes=5000-") in server.gets()
    assert cli("import", FIXTURES / "openai-tiny", "--out", tmp_path / "local").exit_code == 0
    got, want = load_checkpoint(Path(r.stdout.strip())).weights, load_checkpoint(tmp_path / "local").weights
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_unknown_model_name_lists_the_valid_ones(cli, no_network):
    line = one_line_error(cli("download", "gpt2-huge"), 2)
    assert all(name in line for name in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"))


def test_offline_fails_at_once_with_one_line(cli, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    line = one_line_error(cli("download", "gpt2-small"), 1)
    assert "https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors" in line
    assert "cannot connect" in line and "offline" in line
    assert not Path("checkpoints").exists()  # nothing written


def test_revision_with_source_openai_is_refused_by_name(cli, no_network):
    r = cli("download", "gpt2-small", "--source", "openai", "--revision", "v9")
    assert r.exit_code == 2 and "--revision" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_endpoint_that_is_not_a_url_is_a_one_line_usage_error(cli, no_network, monkeypatch):
    r = cli("download", "gpt2-small", "--endpoint", "notaurl")
    assert r.exit_code == 2 and "--endpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("download", "hellaswag", "--endpoint", "notaurl")  # the task's file: the same check, not a ValueError
    assert r.exit_code == 2 and "--endpoint 'notaurl': not an http(s) URL" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not Path("data").exists(), r.stderr
    monkeypatch.setenv("HF_ENDPOINT", "notaurl")
    r = cli("download", "gpt2-small")
    assert r.exit_code == 2 and "HF_ENDPOINT" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_download_into_a_folder_holding_another_checkpoint_is_refused_not_reported_done(cli, tiny_hub, tmp_path):
    # A checkpoint of another model (or a training run's step) is not this download: never "already downloaded".
    assert cli("download", "gpt2-tiny", "--endpoint", tiny_hub.url).exit_code == 0
    other = hub.Pretrained("gpt2-other", "other", 32, 2, 4, "test-org/gpt2-other")
    hub.PRETRAINED[other.name] = other
    try:
        r = cli("download", "gpt2-other", "--out", "checkpoints/pretrained/gpt2-tiny", "--endpoint", tiny_hub.url, "--json")
    finally:
        del hub.PRETRAINED[other.name]
    line = one_line_error(r, 2)
    assert "the pretrained gpt2-tiny, not gpt2-other" in line
    assert len(tiny_hub.gets()) == 2  # nothing fetched for the refused one


def test_openai_file_failing_its_crc_is_deleted_and_fetched_again(cli, server, monkeypatch):
    # Sizes match, a tensor's CRC-32C does not: the files must not stay to be reused by every rerun.
    spec = hub.Pretrained("gpt2-tf-tiny", "tiny", 8, 3, 2, "unused/repo", vocab_size=64, context_length=16)
    monkeypatch.setitem(hub.PRETRAINED, spec.name, spec)
    for name in hub.OPENAI_FILES:
        server.files[f"/models/tiny/{name}"] = (FIXTURES / "openai-tiny" / name).read_bytes()
    data = "/models/tiny/model.ckpt.data-00000-of-00001"
    good = server.files[data]
    server.files[data] = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]
    args = ("download", "gpt2-tf-tiny", "--source", "openai", "--endpoint", f"{server.url}/models")
    line = one_line_error(cli(*args), 1)
    assert "CRC-32C mismatch" in line and "removed" in line
    assert not Path("checkpoints/pretrained/gpt2-tf-tiny/.download").exists()
    server.files[data] = good
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    assert [p for p, _ in server.gets()].count(data) == 2  # fetched anew, not the corrupt copy reused

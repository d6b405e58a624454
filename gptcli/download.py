"""HTTP downloads that resume, verify and land atomically.

A download streams into ``NAME.part`` beside the destination (resuming it with a
Range request when a previous attempt left one), is checked against the expected
size and sha256, and only then is renamed into place. A file that fails the check
is deleted, so nothing unverified is ever used.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from gptcli.errors import InputError, RunError
from gptcli.fsio import fsync_dir, sha256_file, sync

Progress = Callable[[int, Optional[int]], None]  # (bytes done, bytes total or None)
CHUNK = 1 << 20


def check_base_url(url: str, what: str, param: str | None = None) -> None:
    """Refuse a mirror's base URL that is not http(s), naming where it came from (`what`: a parameter, $VAR).

    Raises:
        InputError: `url` is not an http(s) URL.
    """
    if not re.match(r"https?://[^/]", url):
        raise InputError(f"{what} {url!r}: not an http(s) URL", param=param)


def git_blob_sha1_file(path: Path) -> str:
    """The id git gives the file's bytes: sha1 of "blob <size>\\0" + content (how a repository records a file)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    progress: Progress | None = None,
    timeout: float = 30.0,
    git_blob_sha1: str | None = None,
) -> Path:
    """Download `url` to `dest`, resuming `dest`.part, verifying, then renaming into place.

    A `dest` that already matches `sha256`/`size` is kept as it is. A transfer cut
    short keeps its .part file for the next attempt to resume.

    Args:
        url: an http(s) URL.
        dest: the final path; its parent is created.
        sha256: expected hex digest, or None.
        size: expected size in bytes, or None.
        progress: called with (bytes done, total) as data arrives.
        timeout: seconds to wait for the server at connect and between reads.
        git_blob_sha1: expected git blob id (for files a git repository serves), or None.

    Raises:
        RunError: the server cannot be reached or answers with an error, the
            transfer stops early, or the file does not match `size`/`sha256`
            (it is then deleted).
    """
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # deepest first
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _download(url, dest, sha256, size, progress, timeout, git_blob_sha1)
    except BaseException:
        for folder in created:  # a failed download leaves no empty folder it made
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (a .part file to resume from) or not ours to remove
        raise


def _download(url: str, dest: Path, sha256: str | None, size: int | None, progress: Progress | None,
              timeout: float, git_blob_sha1: str | None = None) -> Path:
    if ((sha256 is not None or size is not None or git_blob_sha1 is not None) and dest.is_file()
            and _matches(dest, sha256, size, git_blob_sha1)):
        if progress is not None:
            progress(dest.stat().st_size, dest.stat().st_size)
        return dest
    part = dest.with_name(dest.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    if size is not None and done > size:
        part.unlink()
        done = 0
    total = size
    if size is None or done < size:
        total = _fetch(url, part, done, size, progress, timeout)
    got = part.stat().st_size
    expected = size if size is not None else total
    if expected is not None and got < expected:  # the connection closed early: keep the part to resume
        raise RunError(f"download {url}: interrupted after {got} of {expected} bytes; run again to resume")
    if size is not None and got != size:
        part.unlink()
        raise RunError(f"download {url}: got {got} bytes, expected {size}; the file was removed")
    if sha256 is not None:
        digest = sha256_file(part)
        if digest != sha256.lower():
            part.unlink()
            raise RunError(
                f"download {url}: sha256 {digest} does not match the expected {sha256.lower()}; the file was removed"
            )
    if git_blob_sha1 is not None and (digest := git_blob_sha1_file(part)) != git_blob_sha1.lower():
        part.unlink()
        raise RunError(f"download {url}: git blob id {digest} does not match the expected "
                       f"{git_blob_sha1.lower()}; the file was removed")
    if progress is not None:
        progress(part.stat().st_size, total)
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


def head(url: str, *, timeout: float = 10.0, follow_redirects: bool = True) -> tuple[int, dict[str, str]]:
    """(HTTP status, headers with lower-case names) of a HEAD request for `url`.

    With ``follow_redirects=False`` a redirect is returned as it is (status 3xx):
    a file host may put facts about the file (its hash, say) on the redirect
    rather than on the final answer.

    Raises:
        RunError: the server cannot be reached, or answers with an error status.
    """
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "gptcli", "Accept-Encoding": "identity"})
    try:
        response = _open(request, timeout, None if follow_redirects else _NoRedirect())
    except urllib.error.HTTPError as e:
        if not follow_redirects and 300 <= e.code < 400:
            return e.code, {k.lower(): v for k, v in e.headers.items()}
        raise RunError(f"download {url}: the server answered HTTP {e.code} {e.reason}") from None
    with response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError carrying the redirect's status and headers


def _open(request: urllib.request.Request, timeout: float, handler: urllib.request.BaseHandler | None = None):
    """urlopen, with network failures (offline, refused, timed out) as one-line RunErrors.

    HTTPError (the server answered) is left to the caller.
    """
    try:
        if handler is None:
            return urllib.request.urlopen(request, timeout=timeout)
        return urllib.request.build_opener(handler).open(request, timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RunError(f"download {request.full_url}: cannot connect ({reason}); offline?") from None


def _matches(path: Path, sha256: str | None, size: int | None, git_blob_sha1: str | None = None) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    if git_blob_sha1 is not None and git_blob_sha1_file(path) != git_blob_sha1.lower():
        return False
    return sha256 is None or sha256_file(path) == sha256.lower()


def _fetch(url: str, part: Path, done: int, size: int | None, progress: Progress | None, timeout: float) -> int | None:
    """Stream the rest of `url` into `part`; return the total size if the server said it."""
    headers = {"User-Agent": "gptcli"}
    if done:
        headers["Range"] = f"bytes={done}-"
    try:
        response = _open(urllib.request.Request(url, headers=headers), timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and done:  # nothing left to send: the partial file is complete
            return size or done
        raise RunError(f"download {url}: the server answered HTTP {e.code} {e.reason}") from None
    with response:
        total = size
        if response.status == 206:
            match = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
            if match and total is None:
                total = int(match.group(1))
            mode = "ab"
        else:  # 200: the server ignored the Range header and sends everything again
            done = 0
            mode = "wb"
            if total is None and response.headers.get("Content-Length"):
                total = int(response.headers["Content-Length"])
        try:
            with open(part, mode) as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                sync(f)
        except (OSError, urllib.error.URLError) as e:
            raise RunError(f"download {url}: interrupted after {done} bytes ({e}); run again to resume") from None
    return total

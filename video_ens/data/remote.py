"""Shards and `_info.json` from wherever WebDataset reads: a local path, a `pipe:` command, or an http(s) URL.

    with open_stream("pipe:aws s3 cp s3://bucket/k400/train-000007.tar -", timeout_s=60) as f: ...
    fetch(sibling("https://host/k400/train-{000000..000099}.tar", "_info.json"), timeout_s=60)

WebDataset's own openers (webdataset.gopen) have no read timeout: `pipe:` waits on the command for as long as it
stays silent and http(s) goes through `curl` with only a connect timeout, so a stalled transfer holds a worker, and
with it every rank in its next all-reduce, until the collective timeout (webdataset/webdataset#308). These readers
give up after `timeout_s` without a byte, raise `RemoteError` naming the URL when a command exits non-zero, a
server answers 404 or a connection closes before the promised length, and stop a command that is no longer read.
Standard library only: nothing here needs curl, boto or gsutil (a `pipe:` command may use them).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import re
import select
import signal
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import BinaryIO

from video_ens.data.crashes import describe_exit

__all__ = [
    "RemoteError",
    "NotFound",
    "describe",
    "expand",
    "fetch",
    "is_remote",
    "open_stream",
    "shard_name",
    "sibling",
]

# Bytes read per call from a command or a connection: tarfile asks in 10 KiB records, which costs a select() or a
# recv() each; 1 MiB keeps that per-call overhead under 1% at the ~1 GB/s tar reading runs at here.
BUFFER_BYTES = 1 << 20

# How much of a failed command's stderr its error quotes.
STDERR_TAIL = 600

_URL = re.compile(r"^https?://", re.IGNORECASE)
# The word of a pipe: command that names the shard: ends in .tar (or .tar.gz, .tgz), up to a space or a quote.
_SHARD_WORD = re.compile(r"[^\s'\"]*\.(?:tar(?:\.[A-Za-z0-9]+)?|tgz)(?=$|[\s'\"])")


class RemoteError(OSError):
    """A shard or `_info.json` that could not be read; the message starts with the URL (or the command)."""


class NotFound(RemoteError):
    """The file does not exist there: HTTP 404 or 410, or a local path that is missing."""


# ------------------------------------------------------------------------------------------------------- names


def is_remote(text: str) -> bool:
    """True for a `pipe:` command or an http(s) URL (a brace pattern of either included)."""
    return text.startswith("pipe:") or bool(_URL.match(text))


def expand(text: str) -> list[str]:
    """The shards a brace pattern names, in order (a single name gives itself)."""
    import braceexpand  # a dependency of webdataset

    return list(braceexpand.braceexpand(text))


def _shard_word(command: str) -> re.Match:
    found = list(_SHARD_WORD.finditer(command))
    if len(found) != 1:
        raise ValueError(
            f"pipe:{command}: {'no word' if not found else f'{len(found)} words'} of the command name a .tar file, "
            "so the folder of its _info.json is unknown: name exactly one shard (e.g. pipe:aws s3 cp "
            "s3://bucket/train/train-{000000..000099}.tar -)"
        )
    return found[0]


def shard_name(url: str) -> str:
    """The file name of a shard: "train-000007.tar" for a local path, an http(s) URL (query string dropped) or a
    `pipe:` command whose one .tar word names it. It matches the names `_info.json` lists."""
    if url.startswith("pipe:"):
        return _shard_word(url[5:]).group(0).rsplit("/", 1)[-1]
    if _URL.match(url):
        return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    return os.path.basename(url)


def sibling(url: str, name: str) -> str:
    """`name` in the folder of the shard `url`, read the same way: the path beside it, the URL beside it (query
    string dropped), or the same command with the shard's file name replaced."""
    if url.startswith("pipe:"):
        command = url[5:]
        word = _shard_word(command)
        head = word.group(0).rpartition("/")[0]
        new = f"{head}/{name}" if "/" in word.group(0) else name
        return "pipe:" + command[: word.start()] + new + command[word.end() :]
    if _URL.match(url):
        parts = urllib.parse.urlsplit(url)
        path = parts.path.rpartition("/")[0] + "/" + urllib.parse.quote(name)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    return os.path.join(os.path.dirname(url), name)


def describe(url: str) -> str:
    """How a message names a source: the URL or path, or the command after "pipe:"."""
    return f"command {url[5:]!r}" if url.startswith("pipe:") else url


# ------------------------------------------------------------------------------------------------------ reading


@contextlib.contextmanager
def open_stream(url: str, *, timeout_s: float) -> Iterator[BinaryIO]:
    """A binary stream of `url`, read sequentially; leaving the block stops a command and closes a connection.

    Reads raise RemoteError (naming `url`) when no byte comes for `timeout_s` seconds, when a command ends with a
    non-zero status (checked where its output ends) and when a connection closes before its Content-Length.
    Opening raises NotFound for a missing local file or HTTP 404/410, RemoteError for other failures. Local
    files have no timeout: a hung file system is the data workers' watchdog's to catch (data.worker_timeout_s).
    """
    if url.startswith("pipe:"):
        raw: io.RawIOBase = _Command(url, timeout_s)
    elif _URL.match(url):
        raw = _Http(url, timeout_s)
    else:
        try:
            f = open(url, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise NotFound(f"{url}: no such file") from None
        with f:
            yield f
        return
    try:
        yield io.BufferedReader(raw, buffer_size=BUFFER_BYTES)
    finally:
        raw.close()


def fetch(url: str, *, timeout_s: float, max_bytes: int = 64 << 20) -> bytes:
    """The whole content of a small file (an `_info.json`) at `url`, read like a shard; over `max_bytes` is a
    RemoteError (a dataset index of a million shards is ~60 MB of JSON)."""
    with open_stream(url, timeout_s=timeout_s) as f:
        data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise RemoteError(f"{describe(url)}: more than {max_bytes} bytes, too large for a dataset index")
        f.read()  # to the end, so that a command's exit status is checked
    return data


class _Command(io.RawIOBase):
    """The standard output of `sh -c COMMAND`, with a timeout on every read and the exit status checked at the end."""

    def __init__(self, url: str, timeout_s: float) -> None:
        super().__init__()
        self.url, self.timeout_s = url, timeout_s
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on it
        # Its own session, so that closing kills every process of a pipeline (`curl ... | zcat`), not just the shell.
        # A reader that dies without closing leaves no writer for long either: its next write gets SIGPIPE.
        self._proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=self._stderr,
                                      stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self._fd = self._proc.stdout.fileno()
        self._poll = select.poll()  # not select(): that fails for descriptors past 1023, which a busy rank may hold
        self._poll.register(self._fd, select.POLLIN)
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._done:
            return 0
        if not self._poll.poll(self.timeout_s * 1000):  # milliseconds; POLLHUP at the end counts as ready
            self._kill()
            raise RemoteError(f"{describe(self.url)}: no data for {self.timeout_s:g} s (data.read_timeout_s); "
                              "stopped it")  # fmt: skip
        data = os.read(self._fd, len(buffer))
        if data:
            buffer[: len(data)] = data
            return len(data)
        self._done = True
        try:
            status = self._proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
            raise RemoteError(f"{describe(self.url)}: closed its output but did not exit within "
                              f"{self.timeout_s:g} s (data.read_timeout_s)") from None  # fmt: skip
        if status != 0:
            raise RemoteError(f"{describe(self.url)}: {describe_exit(status)}{self._stderr_tail()}")
        return 0

    def _stderr_tail(self) -> str:
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - STDERR_TAIL))
        text = self._stderr.read().decode("utf-8", "replace").strip()
        return f": {text}" if text else " (nothing on stderr)"

    def _kill(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)

    def close(self) -> None:
        if not self.closed:
            self._kill()  # a reader that stops early (evaluation's share ends mid-shard) does not wait for the rest
            self._proc.stdout.close()
            self._stderr.close()
        super().close()


class _Http(io.RawIOBase):
    """The body of an HTTP GET, with a timeout on connecting and on every read and the length checked at the end."""

    def __init__(self, url: str, timeout_s: float) -> None:
        super().__init__()
        self.url, self.timeout_s = url, timeout_s
        try:
            self._resp = urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 - http(s) only (is_remote)
        except urllib.error.HTTPError as e:
            error = NotFound if e.code in (404, 410) else RemoteError
            raise error(f"{url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise RemoteError(f"{url}: cannot connect: {e.reason}") from None
        except TimeoutError:
            raise RemoteError(f"{url}: no answer within {timeout_s:g} s (data.read_timeout_s)") from None
        except (OSError, http.client.HTTPException) as e:
            raise RemoteError(f"{url}: {type(e).__name__}: {e}") from None
        self._expected = self._resp.length  # None without a Content-Length (chunked: a broken chunk raises)
        self._got = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            # read1: what has arrived, up to the buffer (readinto would wait to fill all of it, and a timeout then
            # loses what it had)
            data = self._resp.read1(len(buffer))
        except TimeoutError:
            raise RemoteError(f"{self.url}: no data for {self.timeout_s:g} s after {self._got} bytes "
                              "(data.read_timeout_s)") from None  # fmt: skip
        except (OSError, http.client.HTTPException) as e:
            raise RemoteError(f"{self.url}: connection lost after {self._got} bytes: {type(e).__name__}: {e}") from None
        n = len(data)
        buffer[:n] = data
        self._got += n
        if n == 0 and len(buffer) and self._expected is not None and self._got < self._expected:
            raise RemoteError(f"{self.url}: connection closed after {self._got} of {self._expected} bytes")
        return n

    def close(self) -> None:
        if not self.closed:
            self._resp.close()
        super().close()

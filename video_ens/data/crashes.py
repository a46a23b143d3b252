"""Samples that kill or hang a data worker: which one it was, and never decoding it again.

A decoder can end its process instead of raising (a segfault in FFmpeg or a codec library, the OOM killer), or hang
in native code where no Python timeout reaches it. Each worker writes the id of the sample it is turning into
tensors, and when it started, into shared memory (`InFlight`) and clears it when done. When a worker dies, or hands
over nothing for data.worker_timeout_s while one sample has held it for most of that time, the stream reads what it
was working on, adds it to the `Quarantine` (kept in a file of the run folder, so a restarted job skips it too),
replaces the workers and goes on from the batch that was being built; the workers then treat a quarantined sample as
bad ("quarantined"), counted like any other bad sample.

Torch reports a dead worker from a SIGCHLD handler that raises in the main thread wherever it happens to be (in the
middle of a training step); `contain_sigchld` keeps that handler from raising, so the death surfaces where the
stream can recover: from the DataLoader's own liveness check while it waits for a batch (every 5 s at most).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

__all__ = ["InFlight", "Quarantine", "contain_sigchld", "dead_workers", "describe_exit", "sample_id"]

# Bytes of a sample id kept per worker (longer ids are cut: shard name and key fit easily).
ID_BYTES = 256


def sample_id(raw: dict) -> str:
    """What identifies a raw sample across runs: its shard's file name and its key."""
    return f"{os.path.basename(str(raw.get('__url__', '')))}/{raw.get('__key__', '<no key>')}"


class InFlight:
    """One slot per worker, in shared memory (forked workers write, the stream reads): the sample being decoded."""

    def __init__(self, workers: int):
        self.slots = max(1, workers)
        self._array = multiprocessing.RawArray("c", self.slots * ID_BYTES)
        self._since = multiprocessing.RawArray("d", self.slots)  # time.time() when the sample was started

    def set(self, worker: int, ident: str) -> None:
        data = ident.encode("utf-8", "replace")[: ID_BYTES - 1]
        self._since[worker] = time.time()
        self._array[worker * ID_BYTES : (worker + 1) * ID_BYTES] = data.ljust(ID_BYTES, b"\0")

    def clear(self, worker: int) -> None:
        self._array[worker * ID_BYTES] = b"\0"

    def age(self, worker: int) -> float:
        """Seconds the worker has been on its current sample (0 when it is on none)."""
        return time.time() - self._since[worker] if self.get(worker) else 0.0

    def get(self, worker: int) -> str:
        raw = bytes(self._array[worker * ID_BYTES : (worker + 1) * ID_BYTES])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class Quarantine:
    """Ids of samples a worker died on, read from and appended to `path` (JSON lines; None: this process only).

    Every rank appends its own lines (O_APPEND writes of one line do not interleave) and reads everyone's at start,
    so a job restarted at any world size skips every sample that killed a worker before."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.ids: dict[str, str] = {}  # id -> what happened
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    self.ids[record["id"]] = str(record.get("detail", ""))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash mid-write: the rest still count

    def __contains__(self, ident: str) -> bool:
        return ident in self.ids

    def add(self, ident: str, detail: str) -> None:
        self.ids[ident] = detail
        if self.path is None:
            return
        line = json.dumps({"id": ident, "detail": detail, "host": socket.gethostname(), "pid": os.getpid(),
                           "time": time.time()}) + "\n"  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def dead_workers(iterator) -> list[tuple[int, int]]:
    """(worker id, exit code) of the DataLoader iterator's workers that have ended (negative: killed by a signal)."""
    dead = []
    for worker, process in enumerate(getattr(iterator, "_workers", None) or []):
        code = process.exitcode
        if code is not None:
            dead.append((worker, code))
    return dead


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


_contained = False


def contain_sigchld() -> None:
    """Keep torch's SIGCHLD handler (installed with the first multi-process DataLoader iterator) from raising in the
    main thread; call after creating an iterator. A dead worker is then reported by the iterator while the stream
    waits for a batch. Once per process; a no-op off the main thread or where there is no SIGCHLD."""
    global _contained
    if _contained or not hasattr(signal, "SIGCHLD"):
        return
    try:
        torch_handler = signal.getsignal(signal.SIGCHLD)
        if not callable(torch_handler):
            return  # torch installed none (yet): nothing would raise

        def handler(signum, frame):
            try:
                torch_handler(signum, frame)
            except RuntimeError:
                pass  # a worker died: the stream finds out from the iterator and recovers

        signal.signal(signal.SIGCHLD, handler)
        _contained = True
    except ValueError:
        pass  # not the main thread

"""Writing a dataset folder: WebDataset shards plus `_info.json`, published in one rename.

The converters never write into the output folder directly. They write into a hidden sibling,
`.<name>.partial-<host>-<pid>`, and only after the last shard and `_info.json` are on disk is that folder renamed to
`<name>` (a same-filesystem rename is atomic). A run that crashes or is interrupted leaves at most the hidden
folder behind (the next conversion to the same name on that host removes it), never a half dataset under the real
name; an existing dataset is only replaced with `overwrite=True`, and a folder that is not a dataset (non-empty,
no `_info.json`) is never replaced.

Shards are plain tars written by `webdataset.ShardWriter` with a fixed member mtime, so the same samples give the
same bytes. Samples arrive already encoded (`schema.encode_*_sample`): the writer adds no encoding of its own.

Durability (video_ens/durable.py): each shard is fsynced when it is closed, `_info.json` is written atomically (which
fsyncs the folder and with it the shards' final names), and the parent folder is fsynced after the publishing
rename, so a crash after `commit()` returns cannot leave a published dataset with empty or missing shards. A write
that fails (disk full, quota, file-size limit) raises an OSError naming the shard or file: the converters end on it
and publish nothing, since it says nothing about the input being converted.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from video_ens import __version__
from video_ens.data.schema import INFO_NAME, KINDS, DatasetInfo, ShardInfo
from video_ens.durable import fsync_path, named, write_atomic

__all__ = [
    "DatasetWriter",
    "ShardSeries",
    "check_replaceable",
    "kill_workers",
    "map_ordered",
    "map_surviving_crashes",
    "skip_summary",
]

# Partial folders carry the host and pid of their writer, so a later run can tell an abandoned one (same host,
# process gone) from one that is still being written, here or on another host of a shared file system.
_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"

# Member timestamp inside shards: any constant makes the tars reproducible; this one is 2020-01-01 UTC.
_MTIME = 1577836800.0

T = TypeVar("T")
R = TypeVar("R")


class ShardSeries:
    """Write samples into `<folder>/<stem>-%06d.tar`, at most `shard_size` samples (or ~`max_shard_bytes`) each.

    Opened lazily, so a series that receives no sample leaves no file. `close()` returns [(path, count), ...].
    Safe to use inside a worker process (each worker with its own stem).
    """

    def __init__(self, folder: str, stem: str, *, shard_size: int, max_shard_bytes: float = 1e9, start: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.pattern = os.path.join(folder, f"{stem}-%06d.tar")
        self.shard_size = shard_size
        self.max_shard_bytes = max_shard_bytes
        self.start = start
        self._writer = None
        self._counts: dict[str, int] = {}

    def write(self, sample: dict[str, Any]) -> None:
        """Raises OSError naming the shard when writing fails (a tar write's own error names no file)."""
        try:
            if self._writer is None:
                import webdataset as wds

                self._writer = wds.ShardWriter(
                    self.pattern,
                    maxcount=self.shard_size,
                    maxsize=self.max_shard_bytes,
                    start_shard=self.start,
                    verbose=0,
                    post=fsync_path,  # called with each shard's path once it is closed
                    encoder=False,  # samples are bytes already; never fall back to pickling
                    mtime=_MTIME,
                )
            self._writer.write(sample)
        except OSError as e:
            if self._writer is None:
                raise  # the first shard's open failed, and that error names the file
            # ShardWriter sets `fname` when it opens a shard, after closing (and fsyncing) the previous one, so it
            # names the shard whose write, open or fsync failed.
            raise named(e, self._writer.fname) from e
        # ShardWriter rotates before a write when the open shard is full, so after the write `fname` names the
        # shard that holds this sample.
        self._counts[self._writer.fname] = self._counts.get(self._writer.fname, 0) + 1

    def close(self) -> list[tuple[str, int]]:
        """Close (and fsync) the open shard; raises OSError naming it when that fails."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as e:
                raise named(e, writer.fname) from e
        return list(self._counts.items())

    def abort(self) -> None:
        """Close the open shard, ignoring errors (after a failed write: its folder is about to be deleted)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # a full disk fails the close too; the half-written tar does not matter
                pass


class DatasetWriter:
    """Build one dataset folder atomically (see the module docstring).

        with DatasetWriter(out, kind="video", converter={...}, shard_size=256) as w:
            for sample in samples:
                w.write(sample)            # or w.add_shards(...) for shards written by worker processes
            w.skip("a.mp4", "unreadable: ...")
            info = w.commit(num_classes=400, label_names=names)

    Leaving the `with` block without `commit()` (an exception, or simply forgetting) deletes the partial folder.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        kind: str,
        converter: dict[str, Any],
        shard_size: int,
        prefix: str | None = None,
        overwrite: bool = False,
        max_shard_bytes: float = 1e9,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.out = os.path.abspath(os.fspath(out))
        self.kind = kind
        self.converter = {**converter, "video_ens_version": __version__}
        self.shard_size = shard_size
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        name = os.path.basename(self.out)
        self.prefix = prefix or name
        check_replaceable(self.out, overwrite=overwrite)
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        self.tmp = os.path.join(parent, f".{name}.partial-{_HOST}-{os.getpid()}")
        _remove_abandoned(parent, name)
        if os.path.exists(self.tmp):  # left by a crashed run that had our pid
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)
        self._shards: list[tuple[str, int]] = []  # (path inside tmp, count), in final order
        self._series: ShardSeries | None = None
        self._series_no = 0
        self._skipped: list[dict[str, str]] = []
        self._done = False

    @property
    def parts_dir(self) -> str:
        """A folder inside the partial dataset where worker processes may write their own shard series."""
        path = os.path.join(self.tmp, "_parts")
        os.makedirs(path, exist_ok=True)
        return path

    def write(self, sample: dict[str, Any]) -> None:
        if self._series is None:
            self._series = ShardSeries(
                self.tmp, f"_seq{self._series_no:04d}", shard_size=self.shard_size, max_shard_bytes=self.max_shard_bytes
            )
            self._series_no += 1
        self._series.write(sample)

    def _close_series(self) -> None:
        if self._series is not None:
            self._shards += self._series.close()
            self._series = None

    def add_shards(self, shards: Iterable[tuple[str, int]]) -> None:
        """Adopt finished shard files (written under `parts_dir`), in order, after anything written so far."""
        self._close_series()
        for path, count in shards:
            if not os.path.abspath(path).startswith(self.tmp + os.sep):
                raise ValueError(f"{path} is not inside the partial dataset {self.tmp}: write it under parts_dir")
            self._shards.append((path, count))

    def skip(self, source: str, reason: str) -> None:
        """Record an input that was left out, and why (listed in `_info.json`)."""
        self._skipped.append({"source": str(source), "reason": str(reason)})

    @property
    def num_written(self) -> int:
        pending = sum(self._series._counts.values()) if self._series is not None else 0
        return sum(c for _, c in self._shards) + pending

    def commit(
        self, *, num_classes: int, label_names: list[str] | None, extra: dict[str, Any] | None = None
    ) -> DatasetInfo:
        """Name the shards `<prefix>-%06d.tar`, write `_info.json`, and publish the folder under its real name."""
        if self._done:
            raise RuntimeError("commit() called twice")
        self._close_series()
        shards = []
        for i, (path, count) in enumerate(x for x in self._shards if x[1] > 0):
            name = f"{self.prefix}-{i:06d}.tar"
            os.replace(path, os.path.join(self.tmp, name))
            shards.append(ShardInfo(name=name, count=count, bytes=os.path.getsize(os.path.join(self.tmp, name))))
        shutil.rmtree(os.path.join(self.tmp, "_parts"), ignore_errors=True)
        info = DatasetInfo(
            kind=self.kind,
            num_samples=sum(s.count for s in shards),
            shards=shards,
            num_classes=int(num_classes),
            label_names=None if label_names is None else [str(n) for n in label_names],
            skipped=self._skipped,
            converter=self.converter,
            extra=dict(extra or {}),
        )
        info.validate(where=os.path.join(self.out, INFO_NAME))
        # Also fsyncs the partial folder, making the shards' new names durable before the folder is published.
        write_atomic(os.path.join(self.tmp, INFO_NAME), info.to_json())
        self._publish()
        self._done = True
        return info

    def _publish(self) -> None:
        check_replaceable(self.out, overwrite=self.overwrite)  # again: the folder may have appeared meanwhile
        parent = os.path.dirname(self.out)
        if os.path.exists(self.out):
            old = os.path.join(parent, f".{os.path.basename(self.out)}.old-{os.getpid()}")
            os.rename(self.out, old)
            try:
                os.rename(self.tmp, self.out)
            except OSError:
                os.rename(old, self.out)  # put the old dataset back under its name
                raise
            fsync_path(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out)
            fsync_path(parent)

    def abort(self) -> None:
        if self._series is not None:
            self._series.abort()
            self._series = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()


def _remove_abandoned(parent: str, name: str) -> None:
    """Delete the partial folders of `name` that interrupted conversions on this host left behind: those whose
    process is gone. A partial folder of another host, or of a conversion still running here, is left alone."""
    prefix = f".{name}.partial-{_HOST}-"
    for entry in os.listdir(parent):
        pid = entry[len(prefix) :]
        if entry.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def skip_summary(skipped: list[tuple[str, str]], examples: int = 5) -> list[str]:
    """Indented lines for an error message about skipped inputs: "N x reason" per reason (the text before the
    first colon), most frequent first, then up to `examples` "e.g. source: reason" lines."""
    counts = collections.Counter(reason.split(":")[0] for _, reason in skipped)
    lines = [f"  {n} x {reason}" for reason, n in counts.most_common()]
    return lines + [f"  e.g. {source}: {reason}" for source, reason in skipped[:examples]]


def check_replaceable(out: str, *, overwrite: bool) -> None:
    """Raise unless `out` is absent, an empty folder, or (with overwrite) a dataset folder."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a folder")
    if not os.listdir(out):
        return
    if not os.path.isfile(os.path.join(out, INFO_NAME)):
        raise FileExistsError(
            f"{out} exists and is not a dataset folder (no {INFO_NAME}); remove it or pick another --out"
        )
    if not overwrite:
        raise FileExistsError(f"{out} already holds a dataset; pass --overwrite to replace it")


def _apply_chunk(fn: Callable[[T], R], chunk: list[T]) -> list[R]:
    return [fn(item) for item in chunk]


def map_ordered(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int = 1, chunksize: int = 1, timeout: float | None = None
) -> Iterator[R]:
    """`map(fn, items)` in order, in `workers` spawned processes when workers > 1.

    timeout: seconds an item may take (workers > 1): when the oldest chunk in flight has not finished after
    timeout x chunksize more seconds, the worker processes are killed and TimeoutError is raised, rather than wait
    forever on a hung decoder. In this process (workers <= 1) nothing can interrupt native code: no timeout.

    Spawned rather than forked: FFmpeg and numpy thread pools do not survive a fork reliably, and `fn` must then be
    a module-level function of an importable module. A `concurrent.futures` pool rather than `multiprocessing.Pool`:
    when a worker dies (a decoder crashing on a damaged file, or a failed start), the executor raises
    BrokenProcessPool, where Pool silently replaces the worker and waits forever for the lost result. At most
    4 chunks per worker are in flight, so results (whole encoded clips) never pile up in memory.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending: collections.deque = collections.deque()
    try:
        chunk: list[T] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == chunksize:
                pending.append(pool.submit(_apply_chunk, fn, chunk))
                chunk = []
                if len(pending) >= 4 * workers:
                    yield from _result(pool, pending.popleft(), timeout and timeout * chunksize)
        if chunk:
            pending.append(pool.submit(_apply_chunk, fn, chunk))
        while pending:
            yield from _result(pool, pending.popleft(), timeout and timeout * chunksize)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(pool, future, timeout: float | None):
    """future.result(timeout); on a timeout the pool's processes are killed (a hung one would block shutdown)."""
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        kill_workers(pool)
        raise TimeoutError(
            f"a worker process gave no result for {timeout:g} s and was killed (a hung decoder?): "
            "raise --timeout if items legitimately take longer"
        ) from None


def kill_workers(pool) -> None:
    """SIGKILL the processes of a ProcessPoolExecutor (the executor then reports itself broken)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.kill()
        except (OSError, ValueError):
            pass


def map_surviving_crashes(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    chunksize: int,
    crashed: Callable[[T, str], R],
    timeout: float | None = None,
) -> Iterator[R]:
    """`map_ordered(fn, items, ...)`, except that an item whose worker process dies, or takes longer than `timeout`
    seconds (a decoder hung on a damaged file), yields `crashed(item, why)`.

    A decoder that crashes (a segfault in native code on a damaged file) kills its worker, and map_ordered then
    raises BrokenProcessPool for every chunk in flight: one bad clip would end the conversion. Here the items from
    the first unfinished one on, as many as map_ordered can have in flight (4 chunks per worker), are redone one at
    a time in a single fresh process, which pins the crash on its item; then the parallel map resumes after them. If
    the crashing item lay further on, the next crash is handled the same way, so every round moves on. With
    workers <= 1 items run in this process, where a crash cannot be survived.
    """
    from concurrent.futures.process import BrokenProcessPool

    items = list(items)
    done = 0
    while done < len(items):
        try:
            for result in map_ordered(fn, items[done:], workers=workers, chunksize=chunksize, timeout=timeout):
                yield result
                done += 1
        except (BrokenProcessPool, TimeoutError):
            for result in _one_at_a_time(fn, items[done : done + 4 * workers * chunksize], crashed, timeout=timeout):
                yield result
                done += 1


def _one_at_a_time(fn, items, crashed, *, max_crashes_in_a_row: int = 3, timeout: float | None = None):
    """fn over items in one spawned worker process, replaced after each crash; see map_surviving_crashes."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = None
    in_a_row = 0
    try:
        for item in items:
            if pool is None:
                pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            try:
                result = pool.submit(fn, item).result(timeout=timeout)
                in_a_row = 0
            except (BrokenProcessPool, TimeoutError) as e:
                if isinstance(e, TimeoutError):
                    kill_workers(pool)
                    e = TimeoutError(f"no result after --timeout {timeout:g} s")
                pool.shutdown(wait=True)
                pool = None
                in_a_row += 1
                if in_a_row >= max_crashes_in_a_row:
                    # Workers that die on every item are not one bad file (a failed start, memory exhausted, ...).
                    raise RuntimeError(
                        f"worker processes died on {in_a_row} items in a row: not a problem of one file; "
                        "see the errors above, or run with --workers 1"
                    ) from e
                result = crashed(item, f"{type(e).__name__}: {e}")
            yield result
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

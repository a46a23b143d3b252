"""Training and evaluation streams over WebDataset shards: clips (Kinetics), frame features (YouTube-8M), images.

    paths = resolve_paths(recipe.data)
    check_compatible(recipe.data, recipe.model.name, model.input_spec)
    train = train_stream(recipe.data, input_spec=..., micro_batch_size=8, rank=r, world_size=n, seed=0, root=paths)
    for batch in train.batches(epoch, start): ...      # {"inputs", "target", "ids"[, "lengths"]} + clip entries
        x = transforms.to_model_input(batch, device)    # clips: resized, flipped, jittered, normalised there
    val = eval_stream(recipe.data, recipe.eval, input_spec=..., rank=r, world_size=n, root=paths)
    for batch in val.batches(): ...                    # every evaluation sample exactly once across ranks
    train.close(); val.close()                         # the worker processes (they live across epochs)

What a sample turns into is `samples.py`; this module decides which samples each rank and worker reads, in which
order, and hands the batches over.

Training: a pure function of (seed, rank, epoch, position)
----------------------------------------------------------
`TrainStream.batches(epoch, start)` yields micro-batches `start, start + 1, ...` of one nominal epoch, and micro-batch
k is the same tensor bit for bit whether the iterator began at 0 or at k. That is what lets a killed run resume at
the micro-batch its checkpoint recorded and reproduce the uninterrupted per-step losses (WebDataset has no
mid-epoch resume state of its own, webdataset/webdataset#271). How:

* Streams. A rank reads W = max(1, data.num_workers) independent sample streams; micro-batch k is built from
  stream k % W, as its (k // W)-th group of B / r consecutive videos (r = data.repeat_samples; B / r samples of
  features or images, where r is 1). DataLoader worker w is handed stream (w + start) % W, so the in-order
  DataLoader, which asks workers 0, 1, ... in turn, returns k = start, start+1, ... The stream therefore also
  depends on data.num_workers: resume with the recipe the checkpoint holds.
* Shards. Each stream is endless. Pass c over the shards draws a permutation of all shards from (seed, epoch, c),
  the same on every rank, and deals it out to the R x W (rank, stream) slots: with at least R x W shards, ranks
  read disjoint shards within a pass. This is WebDataset's resampled-shards scheme (the maintainer's advice for
  multi-node training, webdataset/webdataset#434: a fixed nominal epoch set on the loader, not on the dataset, so
  no rank runs out early and hangs the others in all-reduce, #225) drawn without replacement, so every shard is
  read equally often. The nominal epoch is data.samples_per_epoch (default: the dataset's size), counted in model
  inputs: with repeated sampling an epoch decodes 1 / r as many videos.
* Shuffle. Samples pass through a buffer (per-kind size below) shuffled by an RNG of (seed, rank, epoch, stream),
  emptied at the end of each pass. An epoch that fits in one pass (data.samples_per_epoch at most the dataset size,
  shards of equal size, at least R x W shards) therefore shows each rank a disjoint part of the data.
* Skipping. To start at k, a stream first reads its first k // W groups of raw tar samples and throws them away
  without decoding: tar reading runs at ~1 GB/s here (design/environment.md), decoding a 64-frame window of a
  602x256 clip costs ~30 ms of a core.
* Augmentation. Slot i of micro-batch k draws every random choice (window, scale, crop, flip, colour, frames) from
  a torch.Generator seeded by a hash of (seed, rank, epoch, k, i), so it never depends on what came before.
* Repeated sampling (data.repeat_samples = r, clips): each video decoded once gives r clips in consecutive slots
  of the same micro-batch (MAE-ST's recipe, Feichtenhofer et al. 2022, which measured 1.8x the loading rate for
  r = 2): different crops, scales, flips, colours and windows within the decoded span (`samples.train_clips`).
  The same micro-batch because that is what keeps micro-batch k a function of k alone: spreading a video's clips
  over several micro-batches would make one depend on a decode done for another, which a resume at k has not done.
  A micro-batch thus holds B / r videos (micro_batch_size must be a multiple of r).
* Bad samples (a BadSample of samples.py, an unreadable tar member) are counted in `TrainStream.stats` with their
  key and reason. A micro-batch always has B inputs: the slots of a bad video are refilled from another good video
  of the same micro-batch, decoded again under the bad slots' own generators; a micro-batch whose every video is
  bad (likely only with one or two per micro-batch) refills from the first samples of randomly chosen shards (seeded
  by k; reading a tar's head is cheap). A refill never depends on the stream before the micro-batch, so skipping
  stays decode-free. When more than data.max_skip_fraction of the samples seen (after 100) were bad, the stream
  raises RuntimeError rather than train on what is left. A clip shorter than its window is not bad: the window loops
  (transforms.sample_window).

Workers
-------
Forked (cheap: no re-import of torch and PyAV, which costs seconds per worker when spawned) on the first
`batches()` and kept for the stream's life (DataLoader persistent_workers): each later `batches(epoch, start)`
tells them the new position through a small shared array, and each worker then builds its stream afresh from it,
so micro-batches stay the same pure function of their position; a worker carries nothing from one pass to the next
but its warm process. Forking once matters for short epochs and frequent evaluations: a fresh set of workers cost
about a second each time (first_batch_s in benchmarks/bench_loader.py: fork, imports and a first micro-batch). No
decoder object exists before the fork (decoders open per sample, single-threaded, as torchcodec's and PyAV's users
learned to, meta-pytorch/torchcodec#766). Each worker dies with its rank (PR_SET_PDEATHSIG), so a killed rank
leaves no orphans. The DataLoader gets its own torch.Generator, so iterating never draws from the global torch RNG
(which would shift dropout masks between a resumed and an uninterrupted run).

Hand-over: a worker builds up to PREFETCH_PER_WORKER micro-batches ahead; clip batches are built in shared memory
(`samples.ClipBuffer`) and cross as a handle; a training worker reuses samples.POOL_BUFFERS such buffers, each
again once the consumer has released it (`_hand_back_when_done`: when its frames are garbage). On CUDA they are copied into pinned memory, and the trainer's copy to
the GPU is non-blocking. Before forking, a stream compares what its batches in flight need in /dev/shm (all ranks of
the node) with what /dev/shm holds: more than its size is an error naming --shm-size, more than is free a warning.

Evaluation: every sample once
-----------------------------
Rank r evaluates the samples with global index in [N r / R, N (r + 1) / R), N from _info.json, and its workers
split that range the same way: each byte is read by about one process, counts differ by at most one, and nothing
is padded or repeated (DistributedSampler's padding double-counts, pytorch/pytorch#25162). Sample ids are the
shard keys (unique within a dataset). `eval.batch_size` counts model inputs: videos in mode "full", views in mode
"clips" (a video's views may straddle batches; the metrics average them by id and view_ids), frame-feature videos,
images.

What a batch holds, per kind (normalisation constants in transforms.py: Kinetics 0.45/0.225 as PySlowFast,
ImageNet's for images):
* clip, train: uint8 (B, T, H, W, 3) boxes cut from frames at their stored size (H, W the largest box), with
  "extent" (B, 2), "flip" (B,), "colour" (B, 3) and "crop_size"; `transforms.to_model_input` turns them into
  float (B, 3, T, S, S) on the device. Window: data.frames frames data.frame_stride apart at a random start. Box:
  data.clip_crop "scale_jitter" (a random short side in data.short_side, a random crop_size square at that scale,
  both mapped back to stored pixels) or "resized_crop" (an Inception-style box, data.crop_scale, data.crop_ratio).
* clip, eval: the same layout without flip and colour; the short side scaled to eval.short_side (default
  data.short_side[0], the low end of the training scale), crops of eval.crop_size (default data.crop_size). Mode
  "full": the first eval.max_frames frames, centre crop; one video per entry, and only videos of the same length
  share a batch (consecutive ones: padding frames would change a fully convolutional model's temporal average).
  Mode "clips": eval.num_clips uniform clips x eval.num_crops crops along the long side; "view_ids" = clip x
  num_crops + crop. eval.mode only applies to clips: features and images always give one entry per sample. Where
  eval.short_side is the stored short side the boxes are the crops themselves, bit for bit as decoded.
* features: dequantized to [-2, 2] as the YouTube-8M starter code, rgb then audio (1024 + 128 = 1152). Training
  keeps data.frames frames drawn without replacement and kept in time order (all of a shorter video; the starter
  code draws with replacement), zero-padded to data.frames; evaluation keeps the first eval.max_frames frames,
  zero-padded to the longest in the batch. "lengths" holds the valid frames. Target: (B, C) multi-hot.
* image, train: Inception random-resized crop (data.crop_scale, data.crop_ratio), flip, colour jitter; eval: short
  side to eval.short_side (default crop_size / 0.875), centre crop of eval.crop_size (ImageNet's usual 224-of-256);
  float (B, 3, S, S), finished in the workers.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import math
import multiprocessing
import os
import random
import signal
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from video_ens import dist
from video_ens.config import RecipeError
from video_ens.data import schema
from video_ens.data.crashes import InFlight, Quarantine, contain_sigchld, dead_workers, describe_exit, sample_id
from video_ens.data.samples import (
    POOL_BUFFERS,
    PREFETCH_PER_WORKER,
    BadSample,
    BatchReport,
    ClipBuffer,
    EvalView,
    Item,
    SampleSpec,
    SampleStats,
    collate,
    eval_items,
    read_shard,
    sample_key,
    train_clips,
    train_item,
)
from video_ens.data.sources import DataPaths, check_compatible, list_shards, metrics_task, resolve_paths

__all__ = [
    "DataPaths",
    "EvalStream",
    "TrainStream",
    "check_compatible",
    "eval_stream",
    "metrics_task",
    "resolve_paths",
    "train_stream",
]

# Shuffle buffer per kind, in samples, bounded by memory per worker: a 10 s Kinetics clip re-encoded at short side
# 256 is ~1-2 MB (128 -> ~200 MB), a YouTube-8M video's frame features ~350 KB (300 x 1152 B; 512 -> ~180 MB), an
# ImageNet JPEG ~110 KB (1000 -> ~110 MB). Never more than one stream's share of the dataset: a larger buffer would
# only hold samples of the next pass over the shards.
SHUFFLE_BUFFER = {"clip": 128, "features": 512, "image": 1000}

# The bad-sample fraction is judged only after this many samples, so two bad clips among the first three do not
# stop a run.
MIN_SEEN_FOR_SKIP_CHECK = 100

# A micro-batch whose every sample is bad tries at most this many spare samples before giving up.
SPARE_LIMIT = 64

# Workers a stream replaces after they died decoding a sample (each time the sample is quarantined): more means
# something other than one sample kills them (memory pressure, a broken decoder install), and the stream stops.
MAX_WORKER_CRASHES = 8

# Seconds between checks of the workers while a stream waits for a batch (dead ones, ones stuck on a sample).
POLL_S = 5.0

# ---------------------------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------------------------


def _mix(*parts: Any) -> int:
    """A 63-bit seed from a tuple of ints and strings, stable across processes and Python versions (no hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------------------------
# Workers and the hand-over
# ---------------------------------------------------------------------------------------------------------------


# Signals a DataLoader worker ignores: schedulers (SLURM, Kubernetes) and a terminal's Ctrl-C send them to every
# process of the job, and a worker that died of one would look to its rank like a worker killed by its sample. The
# rank decides: it finishes its step, checkpoints and shuts its workers down.
WORKER_IGNORES = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")


def _worker_init(worker_id: int) -> None:
    """In each DataLoader worker: die with the rank (a rank killed with SIGKILL would otherwise leave its workers
    running until their next check of the parent, every 5 s in torch's worker loop), and leave stop signals to it."""
    for name in WORKER_IGNORES:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):
        pass  # not Linux: the worker loop's own check of the parent ends them


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        # The iterator gives up waiting after POLL_S: the stream then checks its workers (dead, or stuck on one
        # sample) and asks again. torch's own wait checks for dead workers every 5 s, but only when no timeout is
        # set, and a hung worker holds it forever.
        kwargs.update(persistent_workers=True, prefetch_factor=PREFETCH_PER_WORKER, worker_init_fn=_worker_init,
                      timeout=POLL_S)  # fmt: skip
        if "fork" in multiprocessing.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
    return DataLoader(
        dataset,
        batch_size=None,  # workers hand over whole batches
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(0),  # worker base seeds come from here, not the global torch RNG
        **kwargs,
    )


def check_shared_memory(
    batch_bytes: int, num_workers: int, what: str, *, buffers: int = PREFETCH_PER_WORKER + 1, path: str = "/dev/shm"
) -> None:
    """RuntimeError when the batches the workers of every rank on this node keep in flight cannot fit in `path`'s
    size, a warning when they exceed what is free now. In flight per worker (`buffers`): PREFETCH_PER_WORKER batches
    handed over or queued and one being built; a training worker keeps samples.POOL_BUFFERS."""
    if num_workers == 0:
        return
    try:
        fs = os.statvfs(path)
    except OSError:
        return  # no /dev/shm (not Linux): nothing to check against
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = ranks * num_workers * buffers * batch_bytes
    total, free = fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize
    text = (
        f"{what}: {ranks} rank(s) x data.num_workers {num_workers} x {buffers} batches of "
        f"{_size(batch_bytes)} in flight need {_size(need)} of {path}"
    )
    advice = math.ceil(1.5 * need / (1 << 30))  # GiB, with room for the pinned copies' staging and other users
    fix = (
        f"give {path} at least {advice} GiB (docker run --shm-size={advice}g; Kubernetes: an emptyDir with medium "
        "Memory mounted there) or lower data.num_workers or the batch size"
    )
    if need > total:
        raise RuntimeError(f"{text}, which holds {_size(total)} in all: {fix}")
    if need > free and dist.rank() == 0:
        dist.get_logger("video_ens.data").warning(f"{text}, which has {_size(free)} free now: {fix}")


def _size(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def _clip_batch_bytes(inputs: int, frames: int, side: int) -> int:
    return inputs * frames * side * side * 3


class _Stream:
    """What both streams share: the DataLoader (made, and its workers forked, on first use), its hand-over of
    batches with their reports, and `close`."""

    def __init__(self, num_workers: int, what: str, quarantine: Quarantine, worker_timeout_s: float):
        self.num_workers = num_workers
        self.worker_timeout_s = worker_timeout_s
        self._what = what
        self._stats = SampleStats()
        self._dataloader: DataLoader | None = None
        self._iterator = None
        self._passes = 0  # pass counter: a generator of an earlier pass must not go on reading the new one
        self.quarantine = quarantine
        self.inflight = InFlight(num_workers)
        self.worker_crashes = 0

    @property
    def stats(self) -> dict[str, Any]:
        return self._stats.as_dict()

    def _dataset(self) -> IterableDataset:
        raise NotImplementedError

    def _batch_bytes(self) -> int:
        raise NotImplementedError

    def _buffers_per_worker(self) -> int:
        return PREFETCH_PER_WORKER + 1

    def _iterate(self, skip: int = 0) -> Iterator[dict]:
        """The batches of one pass (every batch's "_report" folded into the stats), and how long each was waited for;
        the first `skip` items the workers hand over are dropped unseen (a pass restarted after a worker crash).
        Raises _WorkersDied when a worker died: its sample is then quarantined."""
        if self._dataloader is None:
            check_shared_memory(self._batch_bytes(), self.num_workers, self._what, buffers=self._buffers_per_worker())
            self._dataloader = _loader(self._dataset(), self.num_workers)
        self._iterator = iter(self._dataloader)  # persistent workers: restarts them at the new position
        if self.num_workers:
            contain_sigchld()
        self._passes += 1
        this_pass = self._passes
        self.received = 0
        while True:
            if this_pass != self._passes:
                raise RuntimeError(f"{self._what}: a later batches() call restarted the workers; this one is over")
            start = time.perf_counter()
            try:
                batch = self._next(start)
            except StopIteration:
                return
            self.received += 1
            _hand_back_when_done(batch)
            if self.received <= skip:
                continue
            self._stats.wait_s += time.perf_counter() - start
            self._stats.add(batch.pop("_report"))
            self._check(self._stats)
            if "inputs" in batch:
                yield batch

    def _next(self, start: float) -> dict:
        """The next item, polling the workers every POLL_S while waiting: dead ones and ones stuck on one sample for
        data.worker_timeout_s raise _WorkersDied (their samples quarantined)."""
        while True:
            try:
                return next(self._iterator)
            except (RuntimeError, OSError, EOFError) as exc:
                # A batch whose worker died after sending it fails to arrive (its shared memory is passed through a
                # connection to the sender: ConnectionResetError), before the death itself is visible.
                timed_out = self.num_workers and isinstance(exc, RuntimeError) and "timed out" in str(exc)
                self._worker_died(exc, wait_s=3.0 if self.num_workers and not timed_out else 0.0)  # none to die
                if not timed_out:
                    raise
                self._worker_stuck(exc, time.perf_counter() - start)

    def _worker_died(self, exc: BaseException, wait_s: float = 0.0) -> None:
        """Raise _WorkersDied (with the samples quarantined) if a worker has died, waiting up to wait_s for one to
        show; else return, and the caller re-raises `exc`."""
        deadline = time.monotonic() + wait_s
        while not (dead := dead_workers(self._iterator)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not dead:
            return
        idents = []
        for worker, code in dead:
            ident = self.inflight.get(worker)
            what = f"{self._what}: DataLoader worker {worker} {describe_exit(code)}"
            if ident:
                idents.append(ident)
                self.quarantine.add(ident, what)
                what += f" while decoding {ident}: quarantined ({self.quarantine.path or 'for this process'})"
            else:
                what += " outside any sample"
            dist.get_logger("video_ens.data").warning(f"{what}; starting new workers")
        self._replace_workers(exc, idents)

    def _worker_stuck(self, exc: RuntimeError, waited: float) -> None:
        """Workers that have been on one sample for data.worker_timeout_s are stuck in it: quarantine those samples,
        end the workers, raise _WorkersDied. Returns when none is (yet)."""
        processes = getattr(self._iterator, "_workers", None) or []
        stuck = [w for w in range(len(processes)) if self.inflight.age(w) >= self.worker_timeout_s]
        if not stuck:
            if waited < self.worker_timeout_s or any(self.inflight.get(w) for w in range(len(processes))):
                return  # still within the budget, or a sample is in progress and may yet hit it
            raise RuntimeError(
                f"{self._what}: no batch for data.worker_timeout_s = {self.worker_timeout_s:g} s and no worker is on "
                "one sample for long: they are stuck outside decoding (reading shards from a hung file system?)"
            ) from exc
        idents = []
        for worker in stuck:
            ident = self.inflight.get(worker)
            what = (f"{self._what}: DataLoader worker {worker} spent {self.inflight.age(worker):.0f} s on {ident} "
                    f"(data.worker_timeout_s = {self.worker_timeout_s:g})")  # fmt: skip
            idents.append(ident)
            self.quarantine.add(ident, what)
            dist.get_logger("video_ens.data").warning(f"{what}: quarantined, starting new workers")
            processes[worker].kill()
        self._replace_workers(exc, idents)

    def _replace_workers(self, exc: BaseException, idents: list[str]) -> None:
        """After workers died or were killed stuck (their samples quarantined): stop the rest and raise
        _WorkersDied, so that the stream starts new ones; more than MAX_WORKER_CRASHES times is an error."""
        self.worker_crashes += 1
        if self.worker_crashes > MAX_WORKER_CRASHES:
            raise RuntimeError(
                f"{self._what}: data workers died or hung {self.worker_crashes} times (last: {exc}); more than one "
                "sample is doing it: look for memory pressure (dmesg: oom-kill), a hung file system or a broken "
                "decoder install"
            ) from exc
        self.close()
        raise _WorkersDied(idents) from exc

    def _check(self, stats: SampleStats) -> None:
        pass

    def close(self) -> None:
        """Stop the worker processes (they are persistent); a later `batches()` forks new ones."""
        iterator, self._iterator, self._dataloader = self._iterator, None, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass  # interpreter shutdown: the workers go with the process


def _hand_back_when_done(batch: dict) -> None:
    """Release a pooled batch buffer to its worker once nothing here uses its frames: when the "inputs" tensor
    (and so every view of it, which keeps it alive) is garbage, or now if pin_memory already copied them out."""
    lease = batch.pop("_lease", None)
    if lease is None:
        return
    inputs = batch.get("inputs")
    if inputs is None or not lease.holds(inputs):
        lease.release()
    else:
        weakref.finalize(inputs, lease.release)


class _WorkersDied(Exception):
    """DataLoader workers died; their samples are quarantined and the stream restarts its workers."""


class _Guard:
    """In a worker: refuses quarantined samples and marks the one being decoded (see crashes.py)."""

    def __init__(self, quarantine: Quarantine, inflight: InFlight):
        self.quarantine, self.inflight = quarantine, inflight

    def admit(self, raw: dict) -> None:
        ident = sample_id(raw)
        if ident in self.quarantine:
            raise BadSample(
                "quarantined",
                sample_key(raw),
                f"{self.quarantine.ids[ident]} (quarantine: {self.quarantine.path or 'this process'})",
            )
        self.inflight.set(_worker()[0], ident)

    def done(self) -> None:
        self.inflight.clear(_worker()[0])


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TrainPlan:
    spec: SampleSpec
    shards: tuple[str, ...]
    seed: int
    rank: int
    world_size: int
    streams: int  # W
    batch_size: int  # B
    repeat: int  # r: inputs per decoded video (clips); B / r videos per micro-batch
    buffer_size: int


class _TrainPass(IterableDataset):
    """Micro-batches [start, stop) of one epoch of one rank; each DataLoader worker builds whole micro-batches.

    (epoch, start, stop) live in a small shared array that the stream sets before each pass, so persistent workers
    (forked once) read the position of the pass they are asked for."""

    def __init__(self, plan: _TrainPlan, guard: _Guard):
        super().__init__()
        self.plan = plan
        self.guard = guard
        self.position = multiprocessing.RawArray("q", 3)  # in shared memory: forked workers see the stream's writes
        self._errors: list[dict] = []

    def set_position(self, epoch: int, start: int, stop: int) -> None:
        self.position[:] = [epoch, start, stop]

    def __iter__(self) -> Iterator[dict]:
        p = self.plan
        self.epoch, start, stop = self.position[:]
        worker, workers = _worker()
        assert workers == p.streams, (workers, p.streams)
        first = start + worker  # the DataLoader asks worker 0 first, so it serves micro-batch `start`
        stream = first % p.streams
        samples = self._shuffled(stream)
        videos = p.batch_size // p.repeat
        # Decode-free skip of the batches this stream made before `first`.
        skipped = (first // p.streams) * videos
        next(itertools.islice(samples, skipped, skipped), None)
        self._errors.clear()
        for k in range(first, stop, p.streams):
            raws = list(itertools.islice(samples, videos))
            yield self._batch(k, raws)

    def _slot_shards(self, stream: int, cycle: int) -> list[int]:
        """The shards (indices) this (rank, stream) slot reads in pass `cycle` over the shard list."""
        p = self.plan
        n, slots = len(p.shards), p.world_size * p.streams
        order = random.Random(_mix("shards", p.seed, self.epoch, cycle)).sample(range(n), n)
        slot = p.rank * p.streams + stream
        return [order[i % n] for i in range(slot, max(n, slots), slots)]

    def _pass(self, stream: int, cycle: int, dead: set[int]) -> Iterator[dict]:
        """Raw samples of this slot's shards in pass `cycle`; `dead` collects shards that yield nothing."""
        for shard in self._slot_shards(stream, cycle):
            count = 0
            spec = self.plan.spec
            for sample in read_shard(self.plan.shards[shard], self._errors, spec.max_member_bytes,
                                     read_timeout_s=spec.read_timeout_s):  # fmt: skip
                count += 1
                yield sample
            if count == 0:
                dead.add(shard)
                if len(dead) == len(self.plan.shards):
                    raise RuntimeError(
                        f"no shard of the training set yields a sample ({len(dead)} read, e.g. "
                        f"{self.plan.shards[0]}): {self._errors[-1:] or 'all empty'}"
                    )

    def _shuffled(self, stream: int) -> Iterator[dict]:
        """The slot's endless sample stream, shuffled through a buffer that empties at the end of every pass.

        Emptying it there keeps a pass's samples ahead of the next pass's, whose shards other ranks are reading
        now: an epoch that fits in one pass then gives the ranks disjoint samples.
        """
        p = self.plan
        rng = random.Random(_mix("buffer", p.seed, p.rank, self.epoch, stream))
        buffer: list[dict] = []
        dead: set[int] = set()
        for cycle in itertools.count():
            for sample in self._pass(stream, cycle, dead):
                if len(buffer) < p.buffer_size:
                    buffer.append(sample)
                    continue
                i = rng.randrange(len(buffer))
                yield buffer[i]
                buffer[i] = sample
            while buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()

    def _batch(self, k: int, raws: list[dict]) -> dict:
        p = self.plan
        report = BatchReport()
        report.bad, self._errors[:] = list(self._errors), []
        report.seen = len(raws)
        builder = _MicroBatch(p, k, self.epoch, raws, report)
        good: list[int] = []
        missing: list[int] = []
        for g, raw in enumerate(raws):
            try:
                self._fill(builder, g, raw)
                good.append(g)
            except BadSample as e:
                report.bad.append(e.record)
                missing.append(g)
        # Refill from this micro-batch's own good videos, each bad group from the next good one in turn.
        for m, g in enumerate(list(missing)):
            for t in range(len(good)):
                try:
                    self._fill(builder, g, raws[good[(m + t) % len(good)]])
                    missing.remove(g)
                    break
                except BadSample:
                    continue  # the sample decoded once; another window may hit a damaged stretch
        if missing:
            report.seen += self._refill_from_spares(k, builder, missing, report.bad)
        return {**builder.finish(), "_report": report.finish()}

    def _fill(self, builder: _MicroBatch, g: int, raw: dict) -> None:
        self.guard.admit(raw)
        try:
            builder.fill(g, raw)
        finally:
            self.guard.done()

    def _refill_from_spares(self, k: int, builder: _MicroBatch, missing: list[int], bad: list[dict]) -> int:
        """Fill the groups left empty from the heads of shards in a random order seeded by k; returns samples tried."""
        p = self.plan
        order = random.Random(_mix("spare", p.seed, p.rank, self.epoch, k)).sample(range(len(p.shards)), len(p.shards))
        tried = 0
        errors: list[dict] = []
        while True:
            tried_before = tried
            for shard in order:
                for raw in read_shard(p.shards[shard], errors, p.spec.max_member_bytes,
                                      read_timeout_s=p.spec.read_timeout_s):  # fmt: skip
                    if tried == SPARE_LIMIT:
                        raise RuntimeError(
                            f"micro-batch {k}: its {len(builder.keys)} videos and {SPARE_LIMIT} spares were all bad "
                            f"(last: {(bad + errors)[-1:]}); check the training shards"
                        )
                    tried += 1
                    for g in list(missing):
                        try:
                            self._fill(builder, g, raw)
                            missing.remove(g)
                        except BadSample as e:
                            bad.append(e.record)
                            break  # next spare sample
                    if not missing:
                        bad.extend(errors)
                        return tried
            if tried == tried_before:
                raise RuntimeError(f"micro-batch {k}: no training shard yields a sample: {errors[-1:]}")


class _MicroBatch:
    """One training micro-batch being built: group g (one raw sample) fills inputs g r .. g r + r - 1, each input i
    with the generator of (seed, rank, epoch, k, i), whichever sample ends up filling it."""

    def __init__(self, plan: _TrainPlan, k: int, epoch: int, raws: list[dict], report: BatchReport):
        self.plan, self.report = plan, report
        groups = plan.batch_size // plan.repeat
        self.seeds = [_mix("aug", plan.seed, plan.rank, epoch, k, i) for i in range(plan.batch_size)]
        self.keys: list[str | None] = [None] * groups
        self.labels: list[Any] = [None] * groups
        self.items: list[Item | None] = [None] * groups
        self.clips = None
        if plan.spec.kind == "clip":
            height, width = _clip_capacity(raws, plan.spec, plan.batch_size)
            self.clips = ClipBuffer(plan.batch_size, plan.spec.frames, height=height, width=width, pooled=True)

    def fill(self, g: int, raw: dict) -> None:
        r = self.plan.repeat
        gens = [torch.Generator().manual_seed(seed) for seed in self.seeds[g * r : (g + 1) * r]]  # also for a refill
        if self.clips is not None:
            try:
                self.keys[g], self.labels[g] = train_clips(
                    raw, self.plan.spec, gens, self.clips, g * r, self.report.cost
                )
            except BadSample:
                self.clips.clear(slice(g * r, (g + 1) * r))  # a decode that failed part way leaves no trace
                raise
        else:
            self.items[g] = train_item(raw, self.plan.spec, gens[0])

    def finish(self) -> dict:
        spec, r = self.plan.spec, self.plan.repeat
        if self.clips is None:
            return collate(self.items, spec, pad_to=spec.frames)
        batch = self.clips.batch(spec.crop_size, augmented=True)
        batch["ids"] = [key for key in self.keys for _ in range(r)]
        batch["target"] = torch.tensor([label for label in self.labels for _ in range(r)], dtype=torch.int64)
        return batch


def _clip_capacity(raws: list[dict], spec: SampleSpec, slots: int) -> tuple[int, int]:
    """(height, width) of the largest box these videos' stored sizes (from their metadata) can need: the buffer is
    made that large up front, so it rarely has to grow (a copy) while the micro-batch is decoded. Metadata is a
    claim: a video over the pixel budgets is left out here (train_clips refuses it from its stream header)."""
    height = width = spec.crop_size
    for raw in raws:
        try:
            sample = schema.decode_video_sample(raw)
        except schema.SampleError:
            continue
        if sample.width * sample.height > spec.max_frame_pixels:
            continue
        if spec.clip_crop == "resized_crop":
            h, w = sample.height, sample.width
        else:
            short = min(sample.width, sample.height)
            h = w = math.ceil(spec.crop_size * short / spec.short_side[0]) + 1
        if slots * spec.frames * max(height, h) * max(width, w) > spec.max_clip_pixels:
            continue
        height, width = max(height, h), max(width, w)
    return height, width


class TrainStream(_Stream):
    """One rank's training micro-batches; see the module docstring for the determinism contract.

    Attributes:
        micro_batches_per_epoch: nominal epoch (data.samples_per_epoch, or the dataset size) // (B x world size).
        num_classes: the label map's size (None for a brace pattern without any _info.json to read it from).
        stats: `samples.SampleStats.as_dict()` counted over every micro-batch this process received: samples
            (raw samples read), bad ones by reason with the last keys, frames decoded and delivered, seconds.
    """

    def __init__(
        self,
        plan: _TrainPlan,
        *,
        micro_batches_per_epoch: int,
        num_workers: int,
        max_skip_fraction: float,
        quarantine: Quarantine,
        worker_timeout_s: float = 300.0,
    ):
        super().__init__(num_workers, "training data", quarantine, worker_timeout_s)
        self._plan = plan
        self._pass = _TrainPass(plan, _Guard(self.quarantine, self.inflight))
        self.micro_batches_per_epoch = micro_batches_per_epoch
        self.num_classes = plan.spec.num_classes
        self.repeat = plan.repeat
        self.max_skip_fraction = max_skip_fraction

    def _dataset(self) -> IterableDataset:
        return self._pass

    def _buffers_per_worker(self) -> int:
        return POOL_BUFFERS if self._plan.spec.kind == "clip" else super()._buffers_per_worker()

    def _batch_bytes(self) -> int:
        spec = self._plan.spec
        if spec.kind == "clip":
            return _clip_batch_bytes(self._plan.batch_size, spec.frames, spec.crop_size)
        if spec.kind == "features":
            return self._plan.batch_size * spec.frames * (schema.YT8M_RGB_DIM + schema.YT8M_AUDIO_DIM) * 4
        return self._plan.batch_size * 3 * spec.crop_size**2 * 4

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Micro-batches start, start + 1, ..., micro_batches_per_epoch - 1 of `epoch` on this rank.

        Each is {"inputs", "target", "ids"} plus "lengths" for features and the clip entries (module docstring).
        """
        if not 0 <= start <= self.micro_batches_per_epoch:
            raise ValueError(f"start must be in [0, {self.micro_batches_per_epoch}], got {start}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        k = start
        while k < self.micro_batches_per_epoch:
            self._pass.set_position(epoch, k, self.micro_batches_per_epoch)
            try:
                for batch in self._iterate():
                    k += 1
                    yield batch
                return
            except _WorkersDied:
                continue  # new workers rebuild micro-batch k, the quarantined sample counted as bad

    def _check(self, s: SampleStats) -> None:
        if s.samples >= MIN_SEEN_FOR_SKIP_CHECK and s.bad > self.max_skip_fraction * s.samples:
            raise RuntimeError(
                f"{s.bad} of {s.samples} training samples were bad, more than data.max_skip_fraction = "
                f"{self.max_skip_fraction}: by reason {s.bad_by_reason}, last {list(s.last_bad)[-3:]}; "
                "fix or reconvert the shards"
            )


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


def train_stream(
    data_cfg,
    *,
    input_spec: dict,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    root: DataPaths,
    quarantine: str | os.PathLike | None = None,
) -> TrainStream:
    """The training stream of this rank (see the module docstring). `quarantine`: the file that lists samples a
    data worker died on (crashes.py), read at start and appended to; None keeps the list in this process only."""
    _check_rank(rank, world_size)
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if input_spec.get("kind") != data_cfg.kind:
        raise RecipeError(f"data.kind: {data_cfg.kind!r} but the model takes {input_spec.get('kind')!r} input")
    repeat = data_cfg.repeat_samples
    if micro_batch_size % repeat:
        raise RecipeError(
            f"data.repeat_samples: {repeat} clips per decoded video must fill micro-batches of {micro_batch_size} "
            f"(train.micro_batch_size for this world size) exactly; choose a divisor of {micro_batch_size}"
        )
    listed = list_shards(root.train, "train_shards", data_cfg)
    shards = listed.shards
    num_samples = sum(listed.counts) if listed.counts is not None else None
    num_classes = listed.info.num_classes if listed.info is not None else None
    if num_classes is None and root.val is not None:  # the label map of the evaluation set is the one labels index
        num_classes = list_shards(root.val, "val_shards", data_cfg).info.num_classes
    if data_cfg.kind == "features" and num_classes is None:
        num_classes = schema.YT8M_NUM_CLASSES
    nominal = data_cfg.samples_per_epoch or num_samples
    per_epoch = nominal // (micro_batch_size * world_size)
    if per_epoch < 1:
        where = "data.samples_per_epoch" if data_cfg.samples_per_epoch else f"data.train_shards ({num_samples} samples)"
        raise RecipeError(
            f"{where}: an epoch of {nominal} samples holds no micro-batch of {micro_batch_size} samples on each of "
            f"{world_size} ranks; set data.samples_per_epoch to at least {micro_batch_size * world_size}"
        )
    streams = max(1, data_cfg.num_workers)
    if len(shards) < world_size * streams and rank == 0:
        dist.get_logger("video_ens.data").warning(
            f"data.train_shards has {len(shards)} shard(s) for {world_size} rank(s) x {streams} stream(s): some "
            "(rank, stream) slots read the same shard in a pass, so ranks see overlapping samples within an epoch; "
            f"re-shard into at least {world_size * streams} shards (a converter's --shard-size) to keep them disjoint"
        )
    buffer = SHUFFLE_BUFFER[data_cfg.kind]
    if num_samples is not None:
        buffer = min(buffer, max(1, math.ceil(num_samples / (world_size * streams))))
    plan = _TrainPlan(
        spec=SampleSpec.from_config(data_cfg, num_classes),
        shards=tuple(shards),
        seed=seed,
        rank=rank,
        world_size=world_size,
        streams=streams,
        batch_size=micro_batch_size,
        repeat=repeat,
        buffer_size=buffer,
    )
    return TrainStream(
        plan,
        micro_batches_per_epoch=per_epoch,
        num_workers=data_cfg.num_workers,
        max_skip_fraction=data_cfg.max_skip_fraction,
        quarantine=Quarantine(quarantine),
        worker_timeout_s=data_cfg.worker_timeout_s,
    )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EvalPlan:
    spec: SampleSpec
    view: EvalView
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    rank: int
    world_size: int
    batch_size: int


def _share(lo: int, hi: int, part: int, parts: int) -> tuple[int, int]:
    """Part `part` of `parts` near-equal contiguous pieces of [lo, hi)."""
    n = hi - lo
    return lo + n * part // parts, lo + n * (part + 1) // parts


class _EvalPass(IterableDataset):
    """This rank's share of the evaluation set, split again between the DataLoader workers."""

    def __init__(self, plan: _EvalPlan, guard: _Guard):
        super().__init__()
        self.plan = plan
        self.guard = guard

    def _samples(self, lo: int, hi: int, bad: list[dict]) -> Iterator[dict]:
        """Raw samples with global index in [lo, hi), by the offsets _info.json gives each shard."""
        p = self.plan
        offset = 0
        for url, count in zip(p.shards, p.counts, strict=True):
            begin, offset = offset, offset + count
            if offset <= lo or begin >= hi:
                continue
            shard = read_shard(url, bad, p.spec.max_member_bytes, read_timeout_s=p.spec.read_timeout_s)
            for position, raw in enumerate(shard):
                index = begin + position
                if position >= count:
                    bad.append(
                        {
                            "key": sample_key(raw),
                            "reason": "shard",
                            "detail": f"{url} holds more samples than the {count} _info.json lists",
                        }
                    )
                    break
                if index >= hi:
                    break
                if index >= lo:  # earlier ones are read but never decoded
                    yield raw
            shard.close()  # stops a `pipe:` command at once where this share ends mid-shard

    def __iter__(self) -> Iterator[dict]:
        p = self.plan
        worker, workers = _worker()
        lo, hi = _share(0, sum(p.counts), p.rank, p.world_size)
        lo, hi = _share(lo, hi, worker, workers)
        report = BatchReport()
        pending: list[Item] = []

        def flush() -> dict:
            nonlocal pending, report
            out = {**collate(pending, p.spec, crop_size=p.view.crop_size), "_report": report.finish()}
            pending, report = [], BatchReport()
            return out

        # Read errors of _samples go into the batch being built when they happen: a list of one report's would be
        # handed over with that batch and miss a shard that fails later in the pass.
        read_errors: list[dict] = []
        for raw in self._samples(lo, hi, read_errors):
            report.bad += read_errors
            read_errors.clear()
            report.seen += 1
            try:
                self.guard.admit(raw)
                items = eval_items(raw, p.spec, p.view, report.cost)
            except BadSample as e:
                report.bad.append(e.record)
                continue
            finally:
                self.guard.done()
            for item in items:
                # Mode "full": only videos of equal length share a batch (see the module docstring).
                if (
                    pending
                    and p.spec.kind == "clip"
                    and p.view.mode == "full"
                    and (item.inputs.shape[0] != pending[0].inputs.shape[0])
                ):
                    yield flush()
                pending.append(item)
                if len(pending) == p.batch_size:
                    yield flush()
        report.bad += read_errors
        if pending:
            yield flush()
        elif report.bad or report.seen:
            yield {"_report": report.finish()}  # bad samples at the end still reach the stats


class EvalStream(_Stream):
    """Evaluation batches of this rank; over all ranks, every sample of the evaluation set exactly once.

    Attributes:
        num_classes: label map size; num_samples: samples in the evaluation set (all ranks together).
        label_names: the class names of the set's _info.json, or None.
        aggregate: "mean" for multi-view clips (pass batch["view_ids"] to the metrics), else "none" (one row per sample).
        stats: samples and bad samples of the last `batches()` pass, as TrainStream.stats.
    """

    def __init__(
        self,
        plan: _EvalPlan,
        *,
        num_workers: int,
        quarantine: Quarantine,
        worker_timeout_s: float = 300.0,
        label_names: list[str] | None = None,
    ):
        super().__init__(num_workers, "evaluation data", quarantine, worker_timeout_s)
        self._plan = plan
        self.label_names = label_names
        self.num_classes = plan.spec.num_classes
        self.num_samples = sum(plan.counts)
        self.aggregate = "mean" if plan.spec.kind == "clip" and plan.view.mode == "clips" else "none"

    def _dataset(self) -> IterableDataset:
        return _EvalPass(self._plan, _Guard(self.quarantine, self.inflight))

    def _batch_bytes(self) -> int:
        spec, view, b = self._plan.spec, self._plan.view, self._plan.batch_size
        if spec.kind == "clip":
            frames = view.max_frames if view.mode == "full" else spec.frames
            side = math.ceil(view.crop_size * spec.short_side[1] / view.short_side)  # stored up to the top scale
            return _clip_batch_bytes(b, frames, side)
        if spec.kind == "features":
            return b * view.max_frames * (schema.YT8M_RGB_DIM + schema.YT8M_AUDIO_DIM) * 4
        return b * 3 * view.crop_size**2 * 4

    def batches(self) -> Iterator[dict]:
        """Batches of {"inputs", "target", "ids"} (+ "lengths" for features, "view_ids" in clip mode "clips", the
        clip entries of the module docstring)."""
        self._stats = SampleStats()
        delivered = 0  # items of this pass handed over: a restart after a worker crash drops as many unseen
        while True:
            try:
                yield from self._iterate(skip=delivered)
                return
            except _WorkersDied:
                # Each worker's items come in a fixed order, and the dead worker had not handed over the one holding
                # the quarantined sample: the same first items come again, then the rest without it.
                delivered = max(delivered, self.received)


def eval_stream(
    data_cfg,
    eval_cfg,
    *,
    input_spec: dict,
    rank: int,
    world_size: int,
    root: DataPaths,
    quarantine: str | os.PathLike | None = None,
) -> EvalStream | None:
    """This rank's evaluation stream, or None when data.val_shards is empty; `quarantine` as for train_stream."""
    _check_rank(rank, world_size)
    if root.val is None:
        return None
    listed = list_shards(root.val, "val_shards", data_cfg)
    info = listed.info
    plan = _EvalPlan(
        spec=SampleSpec.from_config(data_cfg, info.num_classes),
        view=EvalView.from_config(data_cfg, eval_cfg, input_spec),
        shards=listed.shards,
        counts=listed.counts,
        rank=rank,
        world_size=world_size,
        batch_size=eval_cfg.batch_size,
    )
    return EvalStream(
        plan,
        num_workers=data_cfg.num_workers,
        quarantine=Quarantine(quarantine),
        worker_timeout_s=data_cfg.worker_timeout_s,
        label_names=info.label_names,
    )

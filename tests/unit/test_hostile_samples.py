"""Hostile samples: each one is a counted skip with its key and reason, and nothing it claims is allocated.

The findings of issue #13 as tests (a sample whose header claims a huge frame, a trillion frames, a (2^40, 1024)
feature array, a PNG that makes Pillow raise SyntaxError, a tar member claiming 1 GiB), then a fuzz test over each
decoder with mutated inputs. Allocations that the old code attempted are bounded with RLIMIT_AS in a child process,
so a regression fails as a MemoryError there instead of swapping the machine."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("webdataset")

from clips import sliding_clip  # noqa: E402

from video_ens.config import DataConfig, EvalConfig  # noqa: E402
from video_ens.data import loader, schema  # noqa: E402
from video_ens.data.decode import Budget, DecodeError, decode_frames  # noqa: E402
from video_ens.data.writer import DatasetWriter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLASSES = 3
# tests/unit and tests/: a child process that imports this module needs both (tests/clips.py).
TEST_PATH = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]


def _video_sample(i: int, video: bytes, *, num_frames: int = 12, width: int = 48, height: int = 40) -> dict:
    return schema.encode_video_sample(
        key=schema.make_key(i, f"c{i}"), video=video, container="mp4", label=i % CLASSES, video_id=f"v{i}",
        fps=25.0, num_frames=num_frames, width=width, height=height,
    )  # fmt: skip


def _png(seed: int, height: int = 30, width: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _broken_png() -> bytes:
    """A PNG whose second IDAT chunk has a mangled type: Pillow opens it, then raises SyntaxError in load()."""
    data = bytearray(_png(7, 200, 200))  # random pixels do not compress: two IDAT chunks
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)
    data[second : second + 4] = b"\x8b\xfc\x10\t"
    return bytes(data)


def _npy_header(shape: tuple[int, int]) -> bytes:
    """A .npy file whose header claims `shape` (uint8), followed by 100 bytes."""
    text = "{'descr': '|u1', 'fortran_order': False, 'shape': " + str(shape) + ", }"
    header = text.encode("latin1")
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(100)


def _write(folder: Path, kind: str, rows: list[dict]) -> None:
    with DatasetWriter(folder, kind=kind, converter={"name": "test"}, shard_size=len(rows)) as writer:
        for row in rows:
            writer.write(row)
        writer.commit(num_classes=CLASSES if kind != "yt8m" else 10, label_names=None)


def _cfg(folder: Path, kind: str, **kw) -> DataConfig:
    base = dict(kind=kind, train_shards=str(folder), val_shards=str(folder), num_workers=0, frames=8,
                frame_stride=1, crop_size=16, short_side=(16, 24))  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def _input_spec(kind: str) -> dict:
    return {
        "clip": {"kind": "clip", "frames": 8, "size": 16},
        "features": {"kind": "features", "dim": 1152, "rgb_dim": 1024, "audio_dim": 128, "train_frames": 8,
                     "max_frames": 300},
        "image": {"kind": "image", "size": 16},
    }[kind]  # fmt: skip


def _eval_all(cfg: DataConfig) -> tuple[list[str], dict]:
    stream = loader.eval_stream(cfg, EvalConfig(mode="full", batch_size=2, max_frames=20),
                                input_spec=_input_spec(cfg.kind), rank=0, world_size=1,
                                root=loader.resolve_paths(cfg))  # fmt: skip
    ids = [key for batch in stream.batches() for key in batch["ids"]]
    stats = stream.stats
    stream.close()
    return ids, stats


def _train_all(cfg: DataConfig, batch: int = 2) -> tuple[list[str], dict]:
    stream = loader.train_stream(cfg, input_spec=_input_spec(cfg.kind), micro_batch_size=batch, rank=0,
                                 world_size=1, seed=0, root=loader.resolve_paths(cfg))  # fmt: skip
    ids = [key for b in stream.batches(0) for key in b["ids"]]
    stats = stream.stats
    stream.close()
    return ids, stats


def _reasons(stats: dict) -> dict[str, str]:
    return {record["key"].split(" ")[0]: record["reason"] for record in stats["last_bad"]}


def _in_child(code: str, limit_gib: float = 2.0, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose address space is capped: an allocation the code should never attempt
    fails there as MemoryError instead of taking the machine's memory."""
    prelude = textwrap.dedent(f"""
        import resource
        limit = int({limit_gib} * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


# ------------------------------------------------------------------------------------------------------- findings


def test_a_huge_frame_in_the_header_is_over_budget_before_anything_is_allocated():
    """4096x4 frames asked for at short side 256 are 262144x256: 32 of them were np.empty'd (6 GiB) and
    MemoryError escaped. Now a DecodeError naming the budget, from the header, in a 2 GiB address space."""
    video = sliding_clip(8, width=4096, height=4)
    assert len(video) < 100_000  # a small file
    run = _in_child(f"""
        from video_ens.data.decode import DecodeError, decode_frames
        try:
            decode_frames({video!r}, list(range(8)) * 4, short_side=256)
        except DecodeError as e:
            print("DecodeError", e)
    """)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "DecodeError" in run.stdout and "262144x256" in run.stdout and "data.max_frame_pixels" in run.stdout
    # within the budget the same call is fine; a budget counts pixels of frames and of the whole clip
    assert decode_frames(video, [0, 1]).shape == (2, 4, 4096, 3)
    with pytest.raises(DecodeError, match=r"8 frames of 4096x4 .*\(data.max_clip_pixels\)"):
        decode_frames(video, list(range(8)), budget=Budget(clip_pixels=4096 * 4 * 7))


def test_a_claimed_trillion_frames_is_a_counted_skip_in_evaluation_and_training(tmp_path):
    """Evaluation built list(range(10**12)) from the sample's metadata (MemoryError, the job died)."""
    good = [_video_sample(i, sliding_clip(12, seed=i)) for i in range(3)]
    liar = _video_sample(3, sliding_clip(12, seed=3), num_frames=10**12)
    _write(tmp_path / "d", "video", [good[0], liar, good[1], good[2]])
    cfg = _cfg(tmp_path / "d", "clip")
    ids, stats = _eval_all(cfg)
    assert sorted(ids) == sorted(s["__key__"] for s in good)
    assert stats["bad"] == 1 and _reasons(stats) == {liar["__key__"]: "budget"}
    assert "data.max_video_frames" in stats["last_bad"][0]["detail"]
    ids, stats = _train_all(cfg)
    assert liar["__key__"] not in ids and _reasons(stats) == {liar["__key__"]: "budget"}


@pytest.mark.parametrize("crop", ["scale_jitter", "resized_crop"])
def test_metadata_claiming_a_huge_picture_does_not_size_the_training_buffer(tmp_path, crop):
    """The micro-batch buffer is sized up front from the samples' metadata: a claimed 10^6 x 10^6 picture made it
    allocate 2 x 8 x 10^12 pixels (MemoryError in the worker). Now the claim is left out of the sizing and the stream
    header decides: the clip is 48 x 40 as stored, so it trains."""
    rows = [_video_sample(i, sliding_clip(12, seed=i)) for i in range(4)]
    rows[1] = _video_sample(1, sliding_clip(12, seed=1), width=10**6, height=10**6)
    _write(tmp_path / "d", "video", rows)
    ids, stats = _train_all(_cfg(tmp_path / "d", "clip", clip_crop=crop))
    assert sorted(ids) == sorted(r["__key__"] for r in rows) and stats["bad"] == 0


def test_a_feature_array_claiming_2_40_rows_is_a_counted_skip(tmp_path):
    """np.load allocated what the .npy header claimed (MemoryError escaped the stream)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        rgb, audio = rng.integers(0, 256, (5, 1024), dtype=np.uint8), rng.integers(0, 256, (5, 128), dtype=np.uint8)
        rows.append(schema.encode_yt8m_sample(key=schema.make_key(i, f"y{i}"), video_id=f"y{i}", rgb=rgb,
                                              audio=audio, labels=[i % 10]))  # fmt: skip
    rows[2]["rgb.npy"] = _npy_header((2**40, 1024))
    _write(tmp_path / "f", "yt8m", rows)
    ids, stats = _eval_all(_cfg(tmp_path / "f", "features", frames=8))
    assert len(ids) == 3 and _reasons(stats) == {rows[2]["__key__"]: "format"}
    assert "header promises 1099511627776 x 1024 bytes" in stats["last_bad"][0]["detail"]


def test_a_png_that_makes_pillow_raise_syntax_error_is_a_counted_skip(tmp_path):
    """Pillow raises SyntaxError for a damaged chunk; only OSError and ValueError were caught."""
    rows = [schema.encode_image_sample(key=schema.make_key(i, f"i{i}"), image=_png(i), format="png", label=i % 3)
            for i in range(4)]  # fmt: skip
    rows[1]["png"] = _broken_png()
    _write(tmp_path / "i", "image", rows)
    cfg = _cfg(tmp_path / "i", "image")
    ids, stats = _eval_all(cfg)
    assert len(ids) == 3 and _reasons(stats) == {rows[1]["__key__"]: "decode"}
    assert "SyntaxError" in stats["last_bad"][0]["detail"]
    ids, stats = _train_all(cfg)
    assert rows[1]["__key__"] not in ids and _reasons(stats) == {rows[1]["__key__"]: "decode"}


def test_an_image_over_the_pixel_budget_is_skipped_from_its_header(tmp_path):
    rows = [schema.encode_image_sample(key=schema.make_key(i, f"i{i}"), image=_png(i), format="png", label=i % 3)
            for i in range(3)]  # fmt: skip
    rows[0]["png"] = _png(0, 60, 80)
    _write(tmp_path / "i", "image", rows)
    ids, stats = _eval_all(_cfg(tmp_path / "i", "image", max_frame_pixels=40 * 40))
    assert len(ids) == 2 and _reasons(stats) == {rows[0]["__key__"]: "budget"}


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write a sparse member")
def test_a_tar_member_over_the_byte_budget_is_skipped_unread(tmp_path):
    """A 10 KB tar whose sparse member is 1 GiB: the reader held the whole GiB in memory. Now the member is not
    read (its size is in the header) and its sample is counted as bad, in a 1.5 GiB address space."""
    good = [_video_sample(i, sliding_clip(12, seed=i)) for i in range(3)]
    _write(tmp_path / "d", "video", good)
    shard = next((tmp_path / "d").glob("*.tar"))
    staging = tmp_path / "staging"
    staging.mkdir()
    with tarfile.open(shard) as tar:
        tar.extractall(staging, filter="data")
    key = schema.make_key(3, "huge")
    for name, data in (("cls", b"1"), ("json", json.dumps({"video_id": "h", "fps": 25.0, "num_frames": 12,
                                                            "width": 48, "height": 40}).encode())):  # fmt: skip
        (staging / f"{key}.{name}").write_bytes(data)
    with open(staging / f"{key}.mp4", "wb") as f:
        f.truncate(1 << 30)  # a hole: no disk used
    names = sorted(p.name for p in staging.iterdir())
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(shard), "-C", str(staging), *names], check=True)
    assert shard.stat().st_size < 200_000
    info = json.loads((tmp_path / "d" / "_info.json").read_text())
    info["shards"][0]["count"] = info["num_samples"] = 4
    info["shards"][0]["bytes"] = shard.stat().st_size
    (tmp_path / "d" / "_info.json").write_text(json.dumps(info))
    run = _in_child(
        f"""
        from pathlib import Path
        import sys
        sys.path[:0] = {TEST_PATH!r}
        from test_hostile_samples import _cfg, _eval_all, _reasons
        ids, stats = _eval_all(_cfg(Path({str(tmp_path / "d")!r}), "clip"))
        print(len(ids), _reasons(stats), stats["last_bad"][0]["detail"])
    """,
        limit_gib=1.5,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith(f"3 {{'{key}': 'budget'}}") and "data.max_member_bytes" in run.stdout


# ----------------------------------------------------------------------------------------------------------- fuzz

FUZZ = r"""
import io, json, sys, random, tempfile, traceback
import numpy as np, torch
sys.path[:0] = TEST_PATH
from clips import sliding_clip
from test_hostile_samples import _png, _video_sample
from video_ens.data import samples, schema, tfrecord
from video_ens.data.samples import BadSample, EvalView, SampleSpec

rng = random.Random(SEED)

def mutate(data: bytes, hot: int = 512) -> bytes:
    d = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not d:
            break
        # half the edits in the headers (first and last `hot` bytes: ftyp/moov, PNG IHDR, npy header)
        if rng.random() < 0.5:
            i = rng.choice([rng.randrange(min(hot, len(d))), len(d) - 1 - rng.randrange(min(hot, len(d)))])
        else:
            i = rng.randrange(len(d))
        op = rng.random()
        if op < 0.4:
            d[i] ^= 1 << rng.randrange(8)
        elif op < 0.7:
            d[i] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x01])
        elif op < 0.8:
            del d[i:]
        elif op < 0.9:
            d[i:i] = d[i : i + rng.randint(1, 64)]
        else:
            d[i : i + 4] = rng.randbytes(4)
    return bytes(d)

spec = SampleSpec(kind="clip", num_classes=3, decoder="pyav", frames=8, frame_stride=1, crop_size=16,
                  short_side=(16, 24), flip=True, color_jitter=0.4, clip_crop="scale_jitter", crop_scale=(0.08, 1.0),
                  crop_ratio=(0.75, 1.333), max_frame_pixels=1 << 20, max_clip_pixels=1 << 24,
                  max_video_frames=10_000)
views = [EvalView("full", 1, 1, 20, 16, 16), EvalView("clips", 2, 3, 20, 16, 16)]
escaped, memory, counts = [], 0, {}

def attempt(kind, fn):
    global memory
    counts[kind] = counts.get(kind, 0) + 1
    try:
        fn()
    except BadSample as e:
        detail = e.record["detail"]
        memory += "MemoryError" in detail and "Cannot allocate memory" not in detail  # FFmpeg's ENOMEM: see below
    except tfrecord.TFRecordError:
        pass
    except tfrecord.ProtobufDecodeError:
        pass
    except Exception:
        escaped.append((kind, traceback.format_exc(limit=4)[-600:]))

def clip_case(raw):
    buffer = samples.ClipBuffer(2, 8, shared=False)
    gens = [torch.Generator().manual_seed(rng.randrange(1 << 30)) for _ in range(2)]
    samples.train_clips(raw, spec, gens, buffer, 0, samples.DecodeCost())
    for view in views:
        samples.eval_items(raw, spec, view)

videos = [sliding_clip(12 + 6 * i, seed=i) for i in range(3)]
for n in range(N_VIDEO):
    raw = _video_sample(n, videos[n % 3], num_frames=12 + 6 * (n % 3))
    raw["mp4"] = mutate(raw["mp4"])
    if n % 4 == 0:  # the metadata too: numbers out of range, wrong types, broken JSON
        meta = json.loads(raw["json"])
        meta[rng.choice(list(meta))] = rng.choice([-1, 0, 10**12, 2**63, 1.5, "x", None, [], {}])
        raw["json"] = mutate(json.dumps(meta).encode(), 64) if n % 8 == 0 else json.dumps(meta).encode()
    attempt("video", lambda: clip_case(raw))

ispec = SampleSpec(**{**spec.__dict__, "kind": "image"})
from PIL import Image
jpeg = io.BytesIO()
Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(jpeg, "JPEG")
images = [("png", _png(0)), ("jpg", jpeg.getvalue())]
for n in range(N_IMAGE):
    fmt, data = images[n % 2]
    raw = schema.encode_image_sample(key=schema.make_key(n, "i"), image=mutate(data, 128), format=fmt, label=1)
    gen = torch.Generator().manual_seed(n)
    attempt("image", lambda: (samples.train_item(raw, ispec, gen), samples.eval_items(raw, ispec, views[0])))

fspec = SampleSpec(**{**spec.__dict__, "kind": "features", "num_classes": 10})
rgb = np.random.default_rng(2).integers(0, 256, (7, 1024), dtype=np.uint8)
audio = np.random.default_rng(3).integers(0, 256, (7, 128), dtype=np.uint8)
for n in range(N_NPY):
    raw = schema.encode_yt8m_sample(key=schema.make_key(n, "f"), video_id="f", rgb=rgb, audio=audio, labels=[1, 4])
    field = rng.choice(["rgb.npy", "audio.npy", "json"])
    raw[field] = mutate(raw[field], 128)
    gen = torch.Generator().manual_seed(n)
    attempt("npy", lambda: (samples.train_item(raw, fspec, gen), samples.eval_items(raw, fspec, views[0])))

example = tfrecord.encode_sequence_example(
    {"id": tfrecord.bytes_feature([b"abc"]), "labels": tfrecord.int64_feature([1, 5, 300])},
    {"rgb": [tfrecord.bytes_feature([bytes(range(64))]) for _ in range(3)],
     "audio": [tfrecord.bytes_feature([bytes(16)]) for _ in range(3)]},
)
with tempfile.TemporaryDirectory() as tmp:
    for n in range(N_TFRECORD):
        path = f"{tmp}/r{n}.tfrecord"
        with tfrecord.TFRecordWriter(path) as w:
            for _ in range(2):
                w.write(example)
        data = open(path, "rb").read()
        open(path, "wb").write(mutate(data, 64))
        def read():
            errors = []
            for payload in tfrecord.iter_records(path, verify=n % 2 == 0, errors=errors):
                tfrecord.decode_sequence_example(payload)
        attempt("tfrecord", read)

import resource
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"counts": counts, "memory": memory, "escaped": escaped[:5], "n_escaped": len(escaped),
                  "peak_rss": peak}))
"""


def test_fuzz_every_decoder_only_skips(tmp_path):
    """Thousands of mutated videos (and their metadata), PNGs and JPEGs, .npy features and TFRecord files through
    the functions a worker or converter runs on them: each ends in a counted skip (BadSample, or TFRecordError /
    ProtobufDecodeError for the converter's reader) or in a result, never in another exception; and no skip was a
    MemoryError of ours (every claim is checked against a budget before anything is allocated), and the process
    never held more than 768 MiB (~300 MB measured). FFmpeg refuses on its own any single allocation over INT_MAX (a mutated mp4 index
    claiming billions of entries): that surfaces as a decode skip reading "Cannot allocate memory", which is
    counted, not failed. In a 3 GiB address space."""
    counts = {"N_VIDEO": 1200, "N_IMAGE": 800, "N_NPY": 800, "N_TFRECORD": 800, "SEED": 1}
    code = "".join(f"{k} = {v}\n" for k, v in counts.items()) + f"TEST_PATH = {TEST_PATH!r}\n" + FUZZ
    run = _in_child(code, limit_gib=3.0, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["counts"] == {"video": 1200, "image": 800, "npy": 800, "tfrecord": 800}
    assert result["n_escaped"] == 0, result["escaped"]
    assert result["memory"] == 0, "a skip was a MemoryError of ours"
    assert result["peak_rss"] < 768 << 20, result["peak_rss"]


# ------------------------------------------------------------------------------------ a sample that kills its worker


@pytest.fixture
def crashing_decoder(monkeypatch):
    """open_video that dies of a real SIGSEGV (a NULL read) on videos starting with b"CRASH"; the DataLoader forks its
    workers, so they inherit the patch. Returns the sample's marker bytes."""
    import ctypes

    from video_ens.data import samples as samples_module

    real = samples_module.open_video

    def open_video(src, **kwargs):
        if bytes(src[:5]) == b"CRASH":
            ctypes.string_at(0)  # segfaults the worker
        return real(src, **kwargs)

    monkeypatch.setattr(samples_module, "open_video", open_video)
    return b"CRASH"


def _crash_dataset(folder: Path, marker: bytes, count: int = 12, crash_at: int = 5) -> list[dict]:
    rows = [_video_sample(i, sliding_clip(12, seed=i)) for i in range(count)]
    rows[crash_at]["mp4"] = marker + rows[crash_at]["mp4"]
    _write(folder, "video", rows)
    return rows


def test_a_sample_that_kills_its_worker_is_quarantined_and_the_batch_rebuilt(tmp_path, crashing_decoder):
    """A segfault in a worker ended the rank ("DataLoader worker ... killed by signal"), and a restart walked into
    the same sample. Now the stream quarantines the sample the dead worker was decoding (in a file), starts new
    workers at the micro-batch being built, and a restarted job never decodes it again. The consumer sleeps as a
    training step would: torch's SIGCHLD handler raised inside it before."""
    import time

    rows = _crash_dataset(tmp_path / "d", crashing_decoder)
    crash_key = rows[5]["__key__"]
    quarantine = tmp_path / "run" / "quarantine.jsonl"
    cfg = _cfg(tmp_path / "d", "clip", num_workers=2, samples_per_epoch=12)

    def stream():
        return loader.train_stream(cfg, input_spec=_input_spec("clip"), micro_batch_size=2, rank=0, world_size=1,
                                   seed=0, root=loader.resolve_paths(cfg), quarantine=quarantine)  # fmt: skip

    first = stream()
    batches = []
    for batch in first.batches(0):
        batches.append(batch)
        time.sleep(0.2)
    assert len(batches) == 6 and first.worker_crashes == 1
    assert crash_key not in [key for b in batches for key in b["ids"]]
    assert first.stats["bad_by_reason"] == {"quarantined": 1}
    lines = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"d-000000.tar/{crash_key}"] and "SIGSEGV" in lines[0]["detail"]
    first.close()
    # A restarted job reads the quarantine: no crash, and exactly the same micro-batches.
    again = stream()
    replay = list(again.batches(0))
    assert again.worker_crashes == 0 and again.stats["bad_by_reason"] == {"quarantined": 1}
    for a, b in zip(batches, replay, strict=True):
        assert a["ids"] == b["ids"] and torch.equal(a["inputs"], b["inputs"])
    again.close()


def test_evaluation_survives_a_sample_that_kills_its_worker(tmp_path, crashing_decoder):
    rows = _crash_dataset(tmp_path / "d", crashing_decoder, count=9, crash_at=7)
    cfg = _cfg(tmp_path / "d", "clip", num_workers=2)
    stream = loader.eval_stream(cfg, EvalConfig(mode="full", batch_size=2, max_frames=8),
                                input_spec=_input_spec("clip"), rank=0, world_size=1,
                                root=loader.resolve_paths(cfg), quarantine=tmp_path / "q.jsonl")  # fmt: skip
    ids = [key for batch in stream.batches() for key in batch["ids"]]
    assert sorted(ids) == sorted(r["__key__"] for i, r in enumerate(rows) if i != 7)  # every other sample once
    assert stream.worker_crashes == 1 and stream.stats["bad_by_reason"] == {"quarantined": 1}
    assert stream.stats["samples"] == 9
    stream.close()


def test_a_sample_that_hangs_its_worker_is_quarantined_after_the_worker_timeout(tmp_path, monkeypatch):
    """A decoder hung in native code (decord, dmlc/decord#375) held the job forever: no timeout anywhere. With
    data.worker_timeout_s the stream finds the worker that has been on one sample that long, quarantines the sample,
    replaces the workers and delivers the whole epoch without it."""
    import time

    from video_ens.data import samples as samples_module

    real = samples_module.open_video

    def open_video(src, **kwargs):
        if bytes(src[:5]) == b"HANG!":
            time.sleep(3600)
        return real(src, **kwargs)

    monkeypatch.setattr(samples_module, "open_video", open_video)
    rows = _crash_dataset(tmp_path / "d", b"HANG!", count=8, crash_at=3)
    cfg = _cfg(tmp_path / "d", "clip", num_workers=2, samples_per_epoch=8, worker_timeout_s=4)
    stream = loader.train_stream(cfg, input_spec=_input_spec("clip"), micro_batch_size=2, rank=0, world_size=1,
                                 seed=0, root=loader.resolve_paths(cfg), quarantine=tmp_path / "q.jsonl")  # fmt: skip
    start = time.monotonic()
    ids = [key for batch in stream.batches(0) for key in batch["ids"]]
    assert time.monotonic() - start < 60
    assert len(ids) == 8 and rows[3]["__key__"] not in ids
    assert stream.worker_crashes == 1 and stream.stats["bad_by_reason"] == {"quarantined": 1}
    detail = json.loads((tmp_path / "q.jsonl").read_text())["detail"]
    assert "data.worker_timeout_s = 4" in detail
    stream.close()


def test_workers_leave_stop_signals_to_their_rank(tmp_path):
    """SLURM signals every process of a job (SIGUSR1, then SIGTERM); a terminal's Ctrl-C sends SIGINT to the whole
    group. A worker that died of one was taken for one killed by its sample. Workers ignore them: the epoch goes on
    with the same workers and nothing is quarantined."""
    import os
    import signal as signals

    rows = [_video_sample(i, sliding_clip(12, seed=i)) for i in range(8)]
    _write(tmp_path / "d", "video", rows)
    cfg = _cfg(tmp_path / "d", "clip", num_workers=2, samples_per_epoch=8)

    def stream():
        return loader.train_stream(cfg, input_spec=_input_spec("clip"), micro_batch_size=2, rank=0, world_size=1,
                                   seed=0, root=loader.resolve_paths(cfg), quarantine=tmp_path / "q.jsonl")  # fmt: skip

    reference = stream()
    expected = [key for batch in reference.batches(0) for key in batch["ids"]]
    reference.close()
    stream = stream()
    ids = []
    for k, batch in enumerate(stream.batches(0)):
        ids += batch["ids"]
        if k == 1:  # both workers have handed over a batch: both are past their start-up
            pids = [w.pid for w in stream._iterator._workers]
            for pid in pids:
                for sig in (signals.SIGUSR1, signals.SIGTERM, signals.SIGINT, signals.SIGHUP):
                    os.kill(pid, sig)
    assert ids == expected
    assert stream.worker_crashes == 0 and [w.pid for w in stream._iterator._workers] == pids
    assert not (tmp_path / "q.jsonl").exists()
    stream.close()

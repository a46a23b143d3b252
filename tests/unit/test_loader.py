"""The loader's contracts: a training stream that is a pure function of (seed, rank, epoch, position), evaluation
that covers every sample exactly once over any number of ranks, bad samples skipped and counted, shapes per kind,
and recipe checks that name the field.

Datasets are built here with the real writer: tiny H.264 clips made with PyAV (48x40, 12-30 frames, a few ms each),
YouTube-8M-style uint8 features, PNG images.
"""

from __future__ import annotations

import collections
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("webdataset")

from clips import sliding_clip  # noqa: E402

from video_ens.config import DataConfig, EvalConfig, RecipeError  # noqa: E402
from video_ens.data import decode, loader, samples, schema  # noqa: E402
from video_ens.data.decode import decode_frames  # noqa: E402
from video_ens.data.transforms import (  # noqa: E402
    ClipEvalTransform,
    sample_window,
    shifted_window,
    to_model_input,
    uniform_clips,
)
from video_ens.data.writer import DatasetWriter  # noqa: E402

CLIP_SPEC = {"kind": "clip", "frames": 8, "size": 16}
FEAT_SPEC = {"kind": "features", "dim": 1152, "rgb_dim": 1024, "audio_dim": 128, "train_frames": 6, "max_frames": 300}
IMAGE_SPEC = {"kind": "image", "size": 16}
CLIP_CLASSES, FEAT_CLASSES, IMAGE_CLASSES = 5, 10, 4


# ----------------------------------------------------------------------------------------------------------- data


def _write(folder, kind: str, samples: list[dict], *, shard_size: int, num_classes: int) -> None:
    with DatasetWriter(folder, kind=kind, converter={"name": "test_loader"}, shard_size=shard_size) as w:
        for s in samples:
            w.write(s)
        w.commit(num_classes=num_classes, label_names=None)


def _clip_samples(count: int, *, garbage: tuple[int, ...] = (), bad_label: tuple[int, ...] = ()) -> list[dict]:
    samples = []
    for i in range(count):
        n = 12 + 6 * (i % 4)  # 12, 18, 24, 30 frames: the 12-frame ones are shorter than an 8 x stride-2 window
        video = b"this is not a video " * 20 if i in garbage else sliding_clip(n, seed=i)
        label = 9 if i in bad_label else i % CLIP_CLASSES
        samples.append(
            schema.encode_video_sample(
                key=schema.make_key(i, f"clip{i}"),
                video=video,
                container="mp4",
                label=label,
                video_id=f"v{i}",
                fps=25.0,
                num_frames=n,
                width=48,
                height=40,
            )
        )
    return samples


def _feat_arrays(i: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    rng = np.random.default_rng(100 + i)
    n = 3 + (i * 7) % 20  # 3..22 frames
    rgb = rng.integers(0, 256, (n, 1024), dtype=np.uint8)
    audio = rng.integers(0, 256, (n, 128), dtype=np.uint8)
    labels = sorted(rng.choice(FEAT_CLASSES, size=1 + i % 3, replace=False).tolist())
    return rgb, audio, labels


def _feat_samples(count: int, *, nan: tuple[int, ...] = (), inf: tuple[int, ...] = ()) -> list[dict]:
    samples = []
    for i in range(count):
        rgb, audio, labels = _feat_arrays(i)
        key = schema.make_key(i, f"yt{i}")
        if i in nan or i in inf:  # a float feature row holding NaN / inf, written around encode_yt8m_sample's check
            bad = rgb.astype(np.float32)
            bad[1] = np.nan if i in nan else -np.inf
            samples.append(
                {
                    "__key__": key,
                    "rgb.npy": schema.npy_bytes(bad),
                    "audio.npy": schema.npy_bytes(audio),
                    "json": b'{"labels":[1],"video_id":"x"}',
                }
            )
            continue
        samples.append(schema.encode_yt8m_sample(key=key, video_id=f"yt{i}", rgb=rgb, audio=audio, labels=labels))
    return samples


def _image_samples(count: int, *, garbage: tuple[int, ...] = ()) -> list[dict]:
    from PIL import Image

    samples = []
    for i in range(count):
        rng = np.random.default_rng(200 + i)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
        data = b"garbage" * 30 if i in garbage else buf.getvalue()
        samples.append(
            schema.encode_image_sample(
                key=schema.make_key(i, f"im{i}"), image=data, format="png", label=i % IMAGE_CLASSES
            )
        )
    return samples


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    _write(root / "clips", "video", _clip_samples(24), shard_size=6, num_classes=CLIP_CLASSES)
    _write(
        root / "clips_bad",
        "video",
        _clip_samples(12, garbage=(3,), bad_label=(7,)),
        shard_size=4,
        num_classes=CLIP_CLASSES,
    )
    _write(root / "feats", "yt8m", _feat_samples(20), shard_size=5, num_classes=FEAT_CLASSES)
    _write(root / "feats_nan", "yt8m", _feat_samples(8, nan=(5,), inf=(6,)), shard_size=4, num_classes=FEAT_CLASSES)
    _write(
        root / "feats_half_bad", "yt8m", _feat_samples(10, nan=(0, 2, 4, 6, 8)), shard_size=5, num_classes=FEAT_CLASSES
    )
    _write(root / "images", "image", _image_samples(12, garbage=(4,)), shard_size=4, num_classes=IMAGE_CLASSES)
    return root


def _cfg(data_root, kind: str = "clip", name: str | None = None, **kw) -> DataConfig:
    name = name or {"clip": "clips", "features": "feats", "image": "images"}[kind]
    base = dict(
        kind=kind,
        train_shards=str(data_root / name),
        val_shards=str(data_root / name),
        num_workers=0,
        frames=8,
        frame_stride=2,
        crop_size=16,
        short_side=(16, 24),
    )
    if kind == "features":
        base["frames"] = 6
    base.update(kw)
    return DataConfig(**base)


def _spec(kind: str) -> dict:
    return {"clip": CLIP_SPEC, "features": FEAT_SPEC, "image": IMAGE_SPEC}[kind]


def _train(cfg: DataConfig, *, batch: int = 3, rank: int = 0, world: int = 1, seed: int = 0) -> loader.TrainStream:
    return loader.train_stream(
        cfg,
        input_spec=_spec(cfg.kind),
        micro_batch_size=batch,
        rank=rank,
        world_size=world,
        seed=seed,
        root=loader.resolve_paths(cfg),
    )


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def _all_same(xs: list[dict], ys: list[dict]) -> bool:
    return len(xs) == len(ys) and all(_same(x, y) for x, y in zip(xs, ys, strict=True))


# ------------------------------------------------------------------------------------------------- train stream


@pytest.mark.parametrize("kind,workers", [("clip", 0), ("clip", 2), ("features", 2), ("image", 0)])
def test_resume_anywhere_gives_the_same_tail(data, kind, workers):
    name = "images" if kind == "image" else None
    # 7 micro-batches: with 2 workers the streams hold 4 and 3, and odd starts hand the first batch to stream 1.
    cfg = _cfg(data, kind, name, num_workers=workers, samples_per_epoch=21)
    stream = _train(cfg, batch=3)
    assert stream.micro_batches_per_epoch == 7
    full = list(stream.batches(1, 0))
    assert len(full) == 7
    for start in (1, 4, 6, 7):
        assert _all_same(list(stream.batches(1, start)), full[start:]), f"start {start}"
    assert _all_same(list(_train(cfg, batch=3).batches(1, 0)), full)  # a fresh stream object agrees too
    assert not _same(full[0], full[1])
    if kind != "image":  # the image set holds one garbage image on purpose
        assert stream.stats["bad"] == 0  # clips of 12 frames under a 15-frame window loop rather than fail


def test_ranks_see_disjoint_samples_and_epochs_differ(data):
    # 4 shards of 6; two ranks, one pass per epoch: each rank reads two whole shards.
    cfg = _cfg(data, samples_per_epoch=24)
    ids = {}
    for rank in (0, 1):
        batches = list(_train(cfg, batch=3, rank=rank, world=2).batches(0, 0))
        ids[rank] = [i for b in batches for i in b["ids"]]
        assert len(ids[rank]) == 12
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(s["__key__"] for s in _clip_samples(24))
    again = [i for b in _train(cfg, batch=3, rank=0, world=2).batches(1, 0) for i in b["ids"]]
    assert again != ids[0]


def test_ranks_with_two_workers_cover_the_data_once(data):
    cfg = _cfg(data, "features", samples_per_epoch=20, num_workers=2)
    # 4 shards of 5 for 2 ranks x 2 workers: each stream reads one shard, one micro-batch of 5 per stream.
    ids = [i for rank in (0, 1) for b in _train(cfg, batch=5, rank=rank, world=2).batches(3, 0) for i in b["ids"]]
    assert sorted(ids) == sorted(s["__key__"] for s in _feat_samples(20))


def test_augmentation_follows_the_seed(data):
    cfg = _cfg(data, samples_per_epoch=6)
    a = list(_train(cfg, seed=1).batches(0, 0))
    b = list(_train(cfg, seed=1).batches(0, 0))
    c = list(_train(cfg, seed=2).batches(0, 0))
    assert _all_same(a, b)
    assert not any(torch.equal(x["inputs"], y["inputs"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_global_rng_is_left_alone(data, workers):
    cfg = _cfg(data, "features", samples_per_epoch=8, num_workers=workers)
    state = torch.get_rng_state()
    list(_train(cfg, batch=2).batches(0, 0))
    assert torch.equal(state, torch.get_rng_state())  # dropout masks of a resumed run stay those of the original


def test_clip_batch_shapes(data):
    batch = next(iter(_train(_cfg(data), batch=3).batches(0, 0)))
    # clips cross the DataLoader as the bytes of boxes cut from the stored 48x40 frames, with what the device needs
    # to finish them: short side 16-24 of 40 stored pixels is a 16-pixel crop cut as a 27-40 pixel box
    b, t, h, w, c = batch["inputs"].shape
    assert (b, t, c) == (3, 8, 3) and batch["inputs"].dtype == torch.uint8
    assert batch["extent"].shape == (3, 2) and batch["crop_size"] == 16
    assert all(27 <= side <= 40 for side in batch["extent"].flatten().tolist())
    assert h >= int(batch["extent"][:, 0].max()) and w >= int(batch["extent"][:, 1].max())
    assert batch["flip"].shape == (3,) and batch["colour"].shape == (3, 3)
    assert batch["target"].dtype == torch.int64 and batch["target"].shape == (3,)
    assert "lengths" not in batch and len(batch["ids"]) == 3
    x = to_model_input(batch)
    assert x.shape == (3, 3, 8, 16, 16) and x.dtype == torch.float32
    # normalised with mean 0.45, std 0.225: [0, 1] maps to [-2, 2.44]
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.45
    labels = {s["__key__"]: int(s["cls"]) for s in _clip_samples(24)}
    assert batch["target"].tolist() == [labels[i] for i in batch["ids"]]


def test_image_batch_shapes(data):
    batch = next(iter(_train(_cfg(data, "image"), batch=4).batches(0, 0)))
    assert batch["inputs"].shape == (4, 3, 16, 16) and batch["inputs"].dtype == torch.float32
    assert batch["target"].shape == (4,) and batch["target"].dtype == torch.int64


def _dequantized(i: int) -> torch.Tensor:
    rgb, audio, _ = _feat_arrays(i)
    return torch.from_numpy(np.concatenate([schema.dequantize(rgb), schema.dequantize(audio)], axis=1))


def test_feature_batches_dequantize_like_the_schema(data):
    index = {s["__key__"]: i for i, s in enumerate(_feat_samples(20))}
    for frames in (6, 30):  # 30 >= every video: all frames are kept
        stream = _train(_cfg(data, "features", frames=frames, samples_per_epoch=20), batch=4)
        assert stream.num_classes == FEAT_CLASSES
        for batch in stream.batches(0, 0):
            assert batch["inputs"].shape == (4, frames, 1152) and batch["inputs"].dtype == torch.float32
            assert batch["lengths"].dtype == torch.int64 and batch["target"].shape == (4, FEAT_CLASSES)
            for b, key in enumerate(batch["ids"]):
                full = _dequantized(index[key])
                n = int(batch["lengths"][b])
                assert n == min(frames, full.shape[0])
                assert torch.all(batch["inputs"][b, n:] == 0)
                rows = batch["inputs"][b, :n]
                # every row is one of the video's frames, in time order, without repeats
                match = [int(torch.nonzero((full == r).all(dim=1))[0]) for r in rows]
                assert match == sorted(set(match))
                if n == full.shape[0]:
                    assert torch.equal(rows, full)
                labels = _feat_arrays(index[key])[2]
                assert torch.nonzero(batch["target"][b]).flatten().tolist() == labels


def test_bad_samples_are_skipped_and_counted(data):
    # One slot, one pass per epoch: every one of the 12 samples is read exactly once.
    stream = _train(_cfg(data, name="clips_bad", samples_per_epoch=12), batch=3)
    batches = list(stream.batches(0, 0))
    keys = [s["__key__"] for s in _clip_samples(12)]
    assert all(len(b["ids"]) == 3 for b in batches)
    seen = {i for b in batches for i in b["ids"]}
    assert keys[3] not in seen and keys[7] not in seen
    assert stream.stats["samples"] == 12 and stream.stats["bad"] == 2
    assert stream.stats["bad_by_reason"] == {"decode": 1, "label": 1}
    assert {(r["key"], r["reason"]) for r in stream.stats["last_bad"]} == {(keys[3], "decode"), (keys[7], "label")}
    # Refilled micro-batches are still pure: resuming past a bad sample reproduces them.
    assert _all_same(list(stream.batches(0, 2)), batches[2:])


def test_a_micro_batch_of_only_bad_samples_refills_from_spares(data):
    stream = _train(_cfg(data, name="clips_bad", samples_per_epoch=12), batch=1)
    batches = list(stream.batches(0, 0))
    assert len(batches) == 12 and all(len(b["ids"]) == 1 for b in batches)
    assert stream.stats["bad_by_reason"] == {"decode": 1, "label": 1}
    assert _all_same(list(stream.batches(0, 5)), batches[5:])


def test_bad_features_and_images_are_counted_with_their_key(data):
    stream = _train(_cfg(data, "features", name="feats_nan", samples_per_epoch=8), batch=2)
    ids = [i for b in stream.batches(0, 0) for i in b["ids"]]
    nan_key, inf_key = (_feat_samples(8)[i]["__key__"] for i in (5, 6))
    assert nan_key not in ids and inf_key not in ids and len(ids) == 8
    assert sorted(r["key"] for r in stream.stats["last_bad"]) == sorted([nan_key, inf_key])
    assert stream.stats["bad_by_reason"] == {"format": 2}  # float rows: the shards hold uint8 features
    images = _train(_cfg(data, "image", samples_per_epoch=12), batch=4)
    list(images.batches(0, 0))
    assert images.stats["bad_by_reason"] == {"decode": 1}
    assert images.stats["last_bad"][0]["key"] == _image_samples(12)[4]["__key__"]


def test_too_many_bad_samples_stop_the_stream(data):
    cfg = _cfg(data, "features", name="feats_half_bad", samples_per_epoch=400, max_skip_fraction=0.3)
    stream = _train(cfg, batch=4)
    with pytest.raises(RuntimeError, match="max_skip_fraction"):
        list(stream.batches(0, 0))
    assert stream.stats["samples"] >= loader.MIN_SEEN_FOR_SKIP_CHECK
    # the same data under a looser limit runs through
    ok = _train(dataclasses.replace(cfg, max_skip_fraction=0.6, samples_per_epoch=120), batch=4)
    assert len(list(ok.batches(0, 0))) == 30


def test_brace_pattern_needs_samples_per_epoch(data):
    pattern = str(data / "clips" / "clips-{000000..000003}.tar")
    with pytest.raises(RecipeError, match="data.samples_per_epoch"):
        loader.resolve_paths(_cfg(data, train_shards=pattern))
    stream = _train(_cfg(data, train_shards=pattern, samples_per_epoch=6), batch=3)
    assert stream.num_classes == CLIP_CLASSES  # from the evaluation set's label map
    assert len(list(stream.batches(0, 0))) == 2
    with pytest.raises(RecipeError, match="data.train_shards"):
        loader.resolve_paths(_cfg(data, train_shards=str(data / "clips" / "nope-{0..3}.tar"), samples_per_epoch=6))


def test_folder_of_the_wrong_kind_is_refused(data):
    with pytest.raises(RecipeError, match=r"data.train_shards: .* 'yt8m' dataset but data.kind is 'clip'"):
        loader.resolve_paths(_cfg(data, train_shards=str(data / "feats")))
    with pytest.raises(RecipeError, match="data.train_shards"):
        loader.resolve_paths(_cfg(data, train_shards=str(data / "missing")))


# -------------------------------------------------------------------------------------------------- eval stream


def _eval(cfg: DataConfig, ecfg: EvalConfig, rank: int, world: int) -> loader.EvalStream:
    return loader.eval_stream(
        cfg, ecfg, input_spec=_spec(cfg.kind), rank=rank, world_size=world, root=loader.resolve_paths(cfg)
    )


@pytest.mark.parametrize("kind,workers", [("features", 0), ("features", 2), ("image", 0), ("clip", 0)])
def test_eval_covers_every_sample_once_on_any_world_size(data, kind, workers):
    cfg = _cfg(data, kind, num_workers=workers)
    ecfg = EvalConfig(mode="full", batch_size=3, max_frames=20)
    expected = {"clip": _clip_samples(24), "features": _feat_samples(20), "image": _image_samples(12)}[kind]
    expected = [s["__key__"] for s in expected]
    if kind == "image":
        expected.remove(_image_samples(12)[4]["__key__"])  # the garbage image
    for world in (1, 2, 3):
        ids, bad = [], 0
        for rank in range(world):
            stream = _eval(cfg, ecfg, rank, world)
            assert stream.num_samples == (12 if kind == "image" else len(expected))
            assert stream.aggregate == "none"
            ids += [i for b in stream.batches() for i in b["ids"]]
            bad += stream.stats["bad"]
        assert collections.Counter(ids) == collections.Counter(expected), f"world {world}"
        assert bad == (1 if kind == "image" else 0)


def test_eval_full_clips_keep_each_video_whole(data):
    cfg = _cfg(data)
    frames = {s["__key__"]: 12 + 6 * (i % 4) for i, s in enumerate(_clip_samples(24))}
    stream = _eval(cfg, EvalConfig(mode="full", batch_size=4, max_frames=20), 0, 1)
    count = 0
    for batch in stream.batches():
        b, c, t, h, w = to_model_input(batch).shape
        assert (c, h, w) == (3, 16, 16) and b == len(batch["ids"]) <= 4
        # every frame_stride-th frame (the training frame rate), at most max_frames; equal lengths share a batch
        assert all(min(-(-frames[i] // cfg.frame_stride), 20) == t for i in batch["ids"])
        count += b
    assert count == 24


def test_eval_clips_mode_gives_every_view_once(data):
    cfg = _cfg(data)
    ecfg = EvalConfig(mode="clips", num_clips=2, num_crops=3, batch_size=4)
    views = collections.Counter()
    for rank in range(2):
        stream = _eval(cfg, ecfg, rank, 2)
        assert stream.aggregate == "mean"
        for batch in stream.batches():
            assert to_model_input(batch).shape[1:] == (3, 8, 16, 16)
            assert batch["view_ids"].dtype == torch.int64
            views.update(zip(batch["ids"], batch["view_ids"].tolist(), strict=True))
    keys = [s["__key__"] for s in _clip_samples(24)]
    assert views == collections.Counter((k, v) for k in keys for v in range(6))


def test_eval_features_pad_to_the_longest_and_dequantize(data):
    index = {s["__key__"]: i for i, s in enumerate(_feat_samples(20))}
    stream = _eval(_cfg(data, "features"), EvalConfig(batch_size=4, max_frames=10), 0, 1)
    assert stream.num_classes == FEAT_CLASSES
    for batch in stream.batches():
        assert batch["inputs"].shape[1] == int(batch["lengths"].max())
        for b, key in enumerate(batch["ids"]):
            full = _dequantized(index[key])
            n = min(10, full.shape[0])
            assert int(batch["lengths"][b]) == n
            assert torch.equal(batch["inputs"][b, :n], full[:n])


def test_eval_counts_bad_samples(data):
    stream = _eval(_cfg(data, name="clips_bad"), EvalConfig(batch_size=5), 0, 1)
    ids = [i for b in stream.batches() for i in b["ids"]]
    assert len(ids) == 10  # the garbage video drops out, and so does the out-of-range label
    assert stream.stats["bad_by_reason"] == {"decode": 1, "label": 1}


def test_no_val_folder_no_eval_stream(data):
    cfg = _cfg(data)
    root = loader.DataPaths(train=data / "clips", val=None)  # a training-only caller (recipes always name one)
    assert loader.eval_stream(cfg, EvalConfig(), input_spec=CLIP_SPEC, rank=0, world_size=1, root=root) is None


def _spy(monkeypatch, name: str) -> list[dict]:
    """Record the keywords every call of samples.<name> gets (workers=0: everything runs in this process)."""
    real, calls = getattr(samples, name), []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(samples, name, spy)
    return calls


def _sample(key: str, folder) -> schema.VideoSample:
    """The sample as stored in the dataset folder (re-encoding with x264 does not always give the same bytes)."""
    for shard in sorted(folder.glob("*.tar")):
        for raw in samples.read_shard(str(shard), []):
            if raw["__key__"] == key:
                return schema.decode_video_sample(raw)
    raise KeyError(key)


def _first_view_frames(batch: dict, cfg: DataConfig, mode: str, folder) -> torch.Tensor:
    """The decoded frames behind the batch's first view (max_frames 20 in mode "full", the first of 2 clips else)."""
    sample = _sample(batch["ids"][0], folder)
    if mode == "full":
        indices = list(range(0, sample.num_frames, cfg.frame_stride))[:20]
    else:
        indices = uniform_clips(sample.num_frames, cfg.frames, cfg.frame_stride, 2)[0]
    return decode_frames(sample.video, indices)


@pytest.mark.parametrize("mode", ["full", "clips"])
def test_clip_eval_runs_at_the_configured_short_side(data, monkeypatch, mode):
    cfg = _cfg(data, short_side=(20, 24))  # crop 16: the old evaluation decoded at 16
    for ecfg, short, crop in [
        (EvalConfig(mode=mode, num_clips=2, batch_size=4, max_frames=20), 20, 16),  # default: data.short_side[0]
        (EvalConfig(mode=mode, num_clips=2, batch_size=4, max_frames=20, short_side=22, crop_size=18), 22, 18),
    ]:
        transforms = _spy(monkeypatch, "ClipEvalTransform")
        batches = list(_eval(cfg, ecfg, 0, 1).batches())
        assert {(t["short_side"], t["crop_size"]) for t in transforms} == {(short, crop)}
        assert all(to_model_input(b).shape[-2:] == (crop, crop) for b in batches)
        monkeypatch.undo()
    # the views are those of the CPU reference at that scale (ClipEvalTransform of the decoded frames)
    ecfg = EvalConfig(mode=mode, num_clips=2, batch_size=4, max_frames=20, short_side=22, crop_size=18)
    batch = next(iter(_eval(cfg, ecfg, 0, 1).batches()))
    frames = _first_view_frames(batch, cfg, mode, data / "clips")
    views = ClipEvalTransform(short_side=22, crop_size=18, num_crops=1 if mode == "full" else 3)(frames)
    assert batch["inputs"].dtype == torch.uint8
    assert torch.allclose(to_model_input(batch)[0], views[0], atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "clips"])
def test_clip_eval_at_the_stored_scale_hands_over_the_decoded_bytes(data, mode):
    """Where eval.short_side is the stored short side (40 here) nothing is resized: the batch holds the decoded
    frames' crops bit for bit, and the model input is exactly their normalisation."""
    cfg = _cfg(data, short_side=(40, 48), crop_size=16)
    ecfg = EvalConfig(mode=mode, num_clips=2, num_crops=3, batch_size=4, max_frames=20, short_side=40, crop_size=32)
    batch = next(iter(_eval(cfg, ecfg, 0, 1).batches()))
    frames = _first_view_frames(batch, cfg, mode, data / "clips")  # (T, 40, 48, 3)
    left = 8 if mode == "full" else 0  # the centre crop, or the first of three along the long side
    assert batch["extent"][0].tolist() == [32, 32]
    assert torch.equal(batch["inputs"][0, :, :32, :32], frames[:, 4:36, left : left + 32])
    expected = (frames[:, 4:36, left : left + 32].permute(3, 0, 1, 2).float() / 255 - 0.45) / 0.225
    assert torch.equal(to_model_input(batch)[0], expected)


def test_image_eval_scale_is_configurable(data, monkeypatch):
    cfg = _cfg(data, "image")
    for ecfg, short, crop in [(EvalConfig(), 18, 16), (EvalConfig(short_side=24, crop_size=20), 24, 20)]:
        calls = _spy(monkeypatch, "ImageEvalTransform")
        batches = list(_eval(cfg, ecfg, 0, 1).batches())
        assert {(c["short_side"], c["crop_size"]) for c in calls} == {(short, crop)}  # default: 16 / 0.875
        assert all(b["inputs"].shape[-2:] == (crop, crop) for b in batches)
        monkeypatch.undo()


def test_clip_crop_option_reaches_the_train_transform(data, monkeypatch):
    default = _cfg(data, samples_per_epoch=3)
    transforms = _spy(monkeypatch, "ClipTrainTransform")
    batches = list(_train(default).batches(0, 0))
    assert default.clip_crop == "scale_jitter"
    assert {t["crop"] for t in transforms} == {"scale_jitter"}
    # short side 16-24 of the 40 stored pixels, crop 16: boxes of 16 x 40 / 24 to 16 x 40 / 16 stored pixels
    assert all(27 <= side <= 40 for b in batches for side in b["extent"].flatten().tolist())
    monkeypatch.undo()

    cfg = _cfg(data, samples_per_epoch=3, clip_crop="resized_crop", crop_scale=(0.3, 0.9), crop_ratio=(0.5, 2.0))
    transforms = _spy(monkeypatch, "ClipTrainTransform")
    a = list(_train(cfg).batches(0, 0))
    assert {(t["crop"], t["scale"], t["ratio"], t["crop_size"]) for t in transforms} == {
        ("resized_crop", (0.3, 0.9), (0.5, 2.0), 16)
    }
    monkeypatch.undo()
    for h, w in a[0]["extent"].tolist():  # boxes of the stored 48 x 40 frames, within the drawn area and aspect
        assert 0.3 * 0.8 <= h * w / (48 * 40) <= 0.9 * 1.2 and 0.5 * 0.8 <= w / h <= 2.0 * 1.2
    assert to_model_input(a[0]).shape == (3, 3, 8, 16, 16)
    assert _all_same(a, list(_train(cfg).batches(0, 0)))  # still a pure function of the seed
    assert not _same(a[0], next(iter(_train(default).batches(0, 0))))


def test_image_crop_ranges_reach_the_train_transform(data, monkeypatch):
    calls = _spy(monkeypatch, "ImageTrainTransform")
    list(_train(_cfg(data, "image", samples_per_epoch=4), batch=4).batches(0, 0))
    assert {(c["scale"], c["ratio"]) for c in calls} == {((0.08, 1.0), (3 / 4, 4 / 3))}  # the defaults: as before
    calls.clear()
    list(
        _train(_cfg(data, "image", samples_per_epoch=4, crop_scale=(0.5, 1.0), crop_ratio=(1.0, 1.0)), batch=4).batches(
            0, 0
        )
    )
    assert {(c["scale"], c["ratio"]) for c in calls} == {((0.5, 1.0), (1.0, 1.0))}


# ---------------------------------------------------------------------------------------------- recipe checks


@pytest.mark.parametrize(
    "data_kw,spec,match",
    [
        (
            dict(kind="features", frames=25),
            {"kind": "clip", "frames": 16, "size": 224},
            r"^data.kind: 'features' data cannot feed model m, which takes 'clip' input",
        ),
        (
            dict(frames=32),
            {"kind": "clip", "frames": 16, "size": 224},
            r"^data.frames: 32 frames but model m expects 16 .*set data.frames to 16",
        ),
        (
            dict(frames=16, crop_size=160, short_side=(160, 200)),
            {"kind": "clip", "frames": 16, "size": 224},
            r"^data.crop_size: 160 but model m expects 224",
        ),
        (
            dict(kind="image", crop_size=192, short_side=(256, 320)),
            {"kind": "image", "size": 224},
            r"^data.crop_size: 192",
        ),
        (dict(kind="clip", frames=16), {"kind": "image", "size": 224}, r"^data.kind: 'clip'"),
        (dict(kind="features", frames=25), {"kind": "features", "dim": 1024, "max_frames": 300}, r"^model.options: "),
        (dict(kind="features", frames=400), {"kind": "features", "dim": 1152, "max_frames": 300}, r"^data.frames: 400"),
    ],
)
def test_check_compatible_names_the_field(data_kw, spec, match):
    cfg = DataConfig(train_shards="x", val_shards="y", **data_kw)
    with pytest.raises(RecipeError, match=match):
        loader.check_compatible(cfg, "m", spec)


def test_check_compatible_accepts_matching_recipes():
    loader.check_compatible(
        DataConfig(train_shards="x", val_shards="y", frames=16, crop_size=224),
        "m",
        {"kind": "clip", "frames": 16, "size": 224},
    )
    loader.check_compatible(DataConfig(train_shards="x", val_shards="y", kind="features", frames=25), "m", FEAT_SPEC)
    assert loader.metrics_task(DataConfig(train_shards="x", val_shards="y", kind="features")) == "multi_label"
    assert loader.metrics_task(DataConfig(train_shards="x", val_shards="y", kind="clip")) == "single_label"


def test_a_truncated_shard_is_counted_and_the_rest_still_read(tmp_path):
    """A shard cut off mid-member (a copy that stopped early): its readable samples and every other shard are
    used, the damaged sample is skipped and counted with its key, and nothing hangs or crashes."""
    folder = tmp_path / "feats_cut"
    _write(folder, "yt8m", _feat_samples(12), shard_size=4, num_classes=FEAT_CLASSES)
    shards = sorted(folder.glob("*.tar"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    cfg = _cfg(tmp_path, "features", name="feats_cut")
    stream = _eval(cfg, EvalConfig(batch_size=4), 0, 1)
    ids = [i for b in stream.batches() for i in b["ids"]]
    keys = [s["__key__"] for s in _feat_samples(12)]
    assert set(keys[:4]) <= set(ids) and set(keys[8:]) <= set(ids), "the intact shards are read in full"
    assert len(ids) == len(set(ids)) and 8 <= len(ids) < 12
    # the member cut in half is skipped and counted under its key (a sample of the damaged shard)
    assert stream.stats["bad"] >= 1
    assert all(r["key"] in keys[4:8] or shards[1].name in r["key"] for r in stream.stats["last_bad"])


def test_fewer_shards_than_rank_stream_slots_is_warned_on_rank_0(data, capfd):
    cfg = _cfg(data, "features", name="feats_nan", samples_per_epoch=8)  # 2 shards
    _train(cfg, batch=1, world=2)
    assert "shard" not in capfd.readouterr().err  # 2 shards for 2 x 1 slots: disjoint
    _train(cfg, batch=1, world=4)
    err = capfd.readouterr().err
    assert "2 shard(s) for 4 rank(s) x 1 stream(s)" in err and "at least 4 shards" in err
    _train(cfg, batch=1, rank=1, world=4)
    assert "shard" not in capfd.readouterr().err  # said once, by rank 0


# ----------------------------------------------------------------------------------- clips: decode once, crop, repeat


def _slot_generator(k: int, i: int, *, seed: int = 0, rank: int = 0, epoch: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(loader._mix("aug", seed, rank, epoch, k, i))


def test_clips_without_jitter_are_the_decoded_bytes(data):
    """At the stored scale with no flip or colour the batch holds the decoded frames' crops bit for bit (what the
    decoder gave before augmentation moved to the device), and the model input is exactly their normalisation."""
    cfg = _cfg(data, short_side=(40, 40), crop_size=16, flip=False, color_jitter=0.0, samples_per_epoch=6)
    spec = samples.SampleSpec.from_config(cfg, CLIP_CLASSES)
    for k, batch in enumerate(_train(cfg, batch=3).batches(0, 0)):
        assert batch["extent"].tolist() == [[16, 16]] * 3 and not batch["flip"].any()
        assert torch.equal(batch["colour"], torch.ones(3, 3))
        for i, key in enumerate(batch["ids"]):
            sample = _sample(key, data / "clips")
            gen = _slot_generator(k, i)
            window = sample_window(sample.num_frames, cfg.frames, cfg.frame_stride, gen)
            top, left, h, w = spec.clip_transform().draw(40, 48, gen).box
            frames = decode_frames(sample.video, window)[:, top : top + h, left : left + w]
            assert torch.equal(batch["inputs"][i, :, :16, :16], frames)
            expected = (frames.permute(3, 0, 1, 2).float() / 255 - 0.45) / 0.225
            assert torch.equal(to_model_input(batch)[i], expected)


@pytest.mark.parametrize("repeat,workers", [(2, 0), (3, 0), (2, 2)])
def test_repeated_sampling_keeps_every_micro_batch_a_function_of_its_position(data, repeat, workers):
    cfg = _cfg(data, num_workers=workers, samples_per_epoch=42, repeat_samples=repeat)
    stream = _train(cfg, batch=6)
    assert stream.micro_batches_per_epoch == 7
    full = list(stream.batches(1, 0))
    assert stream.stats["samples"] == 42 // repeat  # an epoch counts clips: 42 clips from 42 / r videos
    for start in (1, 4, 6):
        assert _all_same(list(stream.batches(1, start)), full[start:]), f"start {start}"
    for batch in full:
        # the r clips of a video sit side by side, with its id and label; they differ in their augmentation
        groups = [list(range(g, g + repeat)) for g in range(0, 6, repeat)]
        for group in groups:
            assert len({batch["ids"][i] for i in group}) == 1 and len({int(batch["target"][i]) for i in group}) == 1
            views = {(tuple(batch["extent"][i].tolist()), tuple(batch["colour"][i].tolist())) for i in group}
            assert len(views) == repeat
        assert len({batch["ids"][g[0]] for g in groups}) == len(groups)


def test_repeated_views_share_one_decode(data):
    """k views of one video cost the decoding of one: the shifted windows lie in the frames the decoder passes
    through anyway, and the video is opened once (counted)."""
    cfg = _cfg(data, short_side=(16, 24), frames=8, frame_stride=1)
    spec = samples.SampleSpec.from_config(cfg, CLIP_CLASSES)
    raw = _clip_samples(24)[3]  # 30 frames, one keyframe: a window's decode starts at frame 0
    costs = {}
    for k in (1, 3):
        cost = samples.DecodeCost()
        buffer = samples.ClipBuffer(k, 8, shared=False)
        samples.train_clips(raw, spec, [_slot_generator(5, j) for j in range(k)], buffer, 0, cost)
        costs[k] = cost
    assert costs[3].frames_decoded == costs[1].frames_decoded  # the same decoding for three views
    assert costs[3].frames_delivered == 3 * costs[1].frames_delivered == 24


def test_repeated_views_are_the_decoded_bytes_of_their_boxes(data):
    """k views of one decode each hold their own box and window of the decoded frames bit for bit (the decoder
    converts only the union of the boxes; each view is cut from it at its own offset)."""
    cfg = _cfg(data, short_side=(40, 56), crop_size=16, flip=False, color_jitter=0.0, frames=8, frame_stride=1)
    spec = samples.SampleSpec.from_config(cfg, CLIP_CLASSES)
    raw = _clip_samples(24)[3]
    sample = _sample(raw["__key__"], data / "clips")
    gens = [_slot_generator(2, j) for j in range(3)]
    buffer = samples.ClipBuffer(3, 8, shared=False)
    samples.train_clips(raw, spec, [_slot_generator(2, j) for j in range(3)], buffer, 0, samples.DecodeCost())
    first = sample_window(sample.num_frames, 8, 1, gens[0])
    with decode.VideoReader(sample.video) as reader:
        lowest = reader.decode_start(first[0])
    windows = [first] + [shifted_window(first, lowest, sample.num_frames, 1, g) for g in gens[1:]]
    boxes = [spec.clip_transform().draw(40, 48, g).box for g in gens]
    assert len(set(boxes)) == 3
    for j, (window, (top, left, h, w)) in enumerate(zip(windows, boxes, strict=True)):
        expected = decode_frames(sample.video, window)[:, top : top + h, left : left + w]
        assert torch.equal(buffer.tensor[j, :, :h, :w], expected)
        assert not buffer.tensor[j, :, h:].any() and not buffer.tensor[j, :, :h, w:].any()


def test_repeated_sampling_opens_each_video_once(data, monkeypatch):
    calls = []
    real = samples.open_video

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(samples, "open_video", counted)
    stream = _train(_cfg(data, samples_per_epoch=12, repeat_samples=3), batch=6)
    batches = list(stream.batches(0, 0))
    assert len(batches) == 2 and len(calls) == 4 == stream.stats["samples"]


def test_repeat_samples_must_divide_the_micro_batch(data):
    with pytest.raises(RecipeError, match="data.repeat_samples: 4 clips per decoded video.*micro-batches of 6"):
        _train(_cfg(data, repeat_samples=4), batch=6)
    with pytest.raises(ValueError, match="applies to clips only"):
        _cfg(data, "features", repeat_samples=2)


def test_clip_buffer_grows_without_losing_placed_views():
    buffer = samples.ClipBuffer(2, 3, height=4, width=4, shared=False)
    buffer.array[0, :, :4, :3] = 7
    buffer.place(0, samples.ClipAugment((0, 0, 4, 3)))
    buffer.ensure(6, 5)
    assert buffer.tensor.shape == (2, 3, 6, 5, 3)
    assert (buffer.array[0, :, :4, :3] == 7).all() and (buffer.array[0, :, 4:] == 0).all()
    assert (buffer.array[0, :, :, 3:] == 0).all()
    assert buffer.extent[0].tolist() == [4, 3]


# ------------------------------------------------------------------------------------------- workers and hand-over


def _worker_pids() -> set[int]:
    import multiprocessing

    return {p.pid for p in multiprocessing.active_children()}


def test_workers_live_across_epochs_and_positions(data):
    """The DataLoader workers are forked once and serve every later epoch and start position, with the same
    micro-batches a fresh stream gives; close() ends them."""
    before = _worker_pids()
    cfg = _cfg(data, num_workers=2, samples_per_epoch=24)
    stream = _train(cfg, batch=3)
    first = list(stream.batches(0, 0))
    pids = _worker_pids() - before
    assert len(pids) == 2
    partial = stream.batches(1, 0)
    next(partial)  # left mid-epoch, as the trainer leaves a stream when it evaluates or stops
    resumed = list(stream.batches(2, 3))
    assert _worker_pids() - before == pids
    with pytest.raises(RuntimeError, match="restarted the workers"):
        next(partial)  # the workers moved on: the old pass cannot hand out batches of the new one
    fresh = _train(cfg, batch=3)
    assert _all_same(resumed, list(fresh.batches(2, 3)))
    assert _all_same(first, list(fresh.batches(0, 0)))
    fresh.close()
    stream.close()
    assert not _worker_pids() - before


def test_clip_batches_cross_in_shared_memory(data):
    batch = next(iter(_train(_cfg(data, num_workers=1, samples_per_epoch=6), batch=3).batches(0, 0)))
    assert batch["inputs"].is_shared()  # built there by the worker: the hand-over passed a handle, not a copy


def test_shared_memory_too_small_for_the_batches_in_flight_is_named(data, monkeypatch):
    class Fs:
        f_frsize = 4096
        f_blocks = 64 << 20 >> 12  # Docker's default: 64 MiB
        f_bavail = f_blocks

    monkeypatch.setattr(loader.os, "statvfs", lambda path: Fs)
    stream = _train(
        _cfg(data, num_workers=2, samples_per_epoch=6, frames=64, crop_size=224, short_side=(256, 320)), batch=3
    )
    with pytest.raises(RuntimeError, match=r"/dev/shm, which holds 64 MiB in all.*--shm-size=1g"):
        next(iter(stream.batches(0, 0)))
    loader.check_shared_memory(1 << 20, 2, "small")  # 6 MiB in flight: fits
    with pytest.raises(RuntimeError, match="2 rank"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        loader.check_shared_memory(6 << 20, 2, "x")


def test_workers_die_with_a_killed_rank(data, tmp_path):
    """A rank killed with SIGKILL (no chance to stop its workers) leaves no worker behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import multiprocessing, sys, time
from video_ens.config import DataConfig
from video_ens.data import loader
cfg = DataConfig(kind="features", train_shards={str(data / "feats")!r}, val_shards={str(data / "feats")!r},
                 frames=6, num_workers=2, samples_per_epoch=20)
stream = loader.train_stream(cfg, input_spec={FEAT_SPEC!r}, micro_batch_size=2, rank=0, world_size=1, seed=0,
                             root=loader.resolve_paths(cfg))
batches = stream.batches(0)
next(batches), next(batches)  # one from each worker: both are past their start-up (and its PR_SET_PDEATHSIG)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie waiting for its reaper has exited already
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 2.0  # without PR_SET_PDEATHSIG they would run on until their 5 s parent check
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


# ------------------------------------------------------------------------------------- pooled batch buffers


@pytest.fixture
def pool(monkeypatch):
    """A fresh pool for ClipBuffers built here as a worker would build them (shared, pooled)."""
    monkeypatch.setattr(samples, "_pool", None)
    return lambda: samples._worker_pool()


def _pooled(height: int, width: int, slots: int = 2, frames: int = 3) -> samples.ClipBuffer:
    return samples.ClipBuffer(slots, frames, height=height, width=width, shared=True, pooled=True)


def _fill(buffer: samples.ClipBuffer, slot: int, h: int, w: int, value: int) -> None:
    buffer.array[slot, :, :h, :w] = value
    buffer.place(slot, samples.ClipAugment((0, 0, h, w)))


def _expected(shape: tuple, boxes: list[tuple[int, int, int]]) -> np.ndarray:
    """What a batch must hold: each slot's box of its value, zeros everywhere else."""
    out = np.zeros(shape, dtype=np.uint8)
    for slot, (h, w, value) in enumerate(boxes):
        out[slot, :, :h, :w] = value
    return out


def test_a_released_buffer_is_reused_with_its_old_pixels_cleared(pool):
    first = _pooled(6, 6)
    _fill(first, 0, 6, 6, 9)
    _fill(first, 1, 6, 6, 8)
    batch = first.batch(4, augmented=False)
    held = _pooled(6, 6)  # the first is still held: this one is new memory
    assert held.tensor.data_ptr() != batch["inputs"].data_ptr()
    batch["_lease"].release()
    again = _pooled(6, 6)  # same shape: only the last boxes' overhang is cleared
    assert again.tensor.data_ptr() == batch["inputs"].data_ptr()
    _fill(again, 0, 4, 3, 5)
    _fill(again, 1, 6, 2, 4)
    assert np.array_equal(again.array, _expected((2, 3, 6, 6, 3), [(4, 3, 5), (6, 2, 4)]))
    out = again.batch(4, augmented=False)
    out["_lease"].release()
    other = _pooled(5, 7)  # fits the same memory with another shape: all padding is cleared
    assert other.tensor.data_ptr() == batch["inputs"].data_ptr()
    _fill(other, 0, 2, 7, 3)
    _fill(other, 1, 5, 1, 2)
    assert np.array_equal(other.array, _expected((2, 3, 5, 7, 3), [(2, 7, 3), (5, 1, 2)]))
    assert len(pool().storages) == 2


def test_a_reused_buffer_that_grows_clears_the_slots_placed_after(pool):
    first = _pooled(6, 6)
    _fill(first, 0, 6, 6, 9)
    _fill(first, 1, 6, 6, 8)
    first.batch(4, augmented=False)["_lease"].release()
    buffer = _pooled(6, 6)  # reused: slot 1 still holds the 8s until it is placed
    _fill(buffer, 0, 2, 2, 7)
    buffer.ensure(8, 8)  # copies the old slots, 8s included, into new memory
    _fill(buffer, 1, 3, 3, 6)
    assert np.array_equal(buffer.array, _expected((2, 3, 8, 8, 3), [(2, 2, 7), (3, 3, 6)]))
    assert pool().flag(0).item() == 0  # the buffer it grew out of went back to the pool


def test_pooled_batches_equal_fresh_ones_and_reuse_their_memory(data):
    """One worker reusing its buffers (each batch dropped after use, as the trainer does) hands over the same bytes
    as the main process building every batch in new memory, in no more buffers than the pool holds."""
    import os

    cfg = _cfg(data, samples_per_epoch=24, short_side=(48, 96))
    reference = [b["inputs"].clone() for b in _train(cfg, batch=2).batches(0, 0)]
    stream = _train(dataclasses.replace(cfg, num_workers=1), batch=2)
    files, got, boxes = set(), [], set()
    for batch in stream.batches(0, 0):
        got.append(batch["inputs"].clone())
        boxes.update(map(tuple, batch["extent"].tolist()))
        fd, _ = batch["inputs"].untyped_storage()._share_fd_cpu_()
        files.add(os.fstat(fd).st_ino)
        del batch
    stream.close()
    assert len(got) == 12 and all(torch.equal(a, b) for a, b in zip(got, reference, strict=True))
    assert len(boxes) > 4  # boxes of many sizes: reused buffers held other boxes before
    assert len(files) <= samples.POOL_BUFFERS


def test_an_image_stored_turned_is_read_upright_by_its_exif_orientation():
    """Training sees a phone photo the way tools/predict.py does: turned by its EXIF orientation."""
    from PIL import Image

    upright = np.random.default_rng(3).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    samples_ = {}
    for name, pixels, extra in (("upright", upright, {}), ("turned", np.rot90(upright, 1), {"exif": exif})):
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG", **extra)
        samples_[name] = schema.encode_image_sample(key=name, image=out.getvalue(), format="png", label=0)
    spec = samples.SampleSpec.from_config(DataConfig(kind="image", train_shards="x", val_shards="x"), num_classes=2)
    for raw in samples_.values():
        _, pixels = samples._image(raw, spec)
        assert np.array_equal(pixels.numpy(), upright)


def test_batches_dropped_by_a_restart_give_their_buffers_back(data):
    """A pass left mid-epoch (the trainer evaluates or stops) leaves prefetched batches that the restart drops
    unseen: their buffers go back to the pool too, so later passes still reuse memory."""
    import os

    stream = _train(_cfg(data, num_workers=1, samples_per_epoch=24, short_side=(48, 96)), batch=2)
    for epoch in range(4):  # each leaves its prefetched batches behind
        partial = stream.batches(epoch, 0)
        next(partial)
        del partial
    files = set()
    for batch in stream.batches(5, 0):
        fd, _ = batch["inputs"].untyped_storage()._share_fd_cpu_()
        files.add(os.fstat(fd).st_ino)
        del batch
    stream.close()
    assert len(files) <= samples.POOL_BUFFERS

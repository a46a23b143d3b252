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

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("webdataset")

from video_ens.config import DataConfig, EvalConfig, RecipeError  # noqa: E402
from video_ens.data import loader, schema  # noqa: E402
from video_ens.data.transforms import to_model_input  # noqa: E402
from video_ens.data.writer import DatasetWriter  # noqa: E402

CLIP_SPEC = {"kind": "clip", "frames": 8, "size": 16}
FEAT_SPEC = {"kind": "features", "dim": 1152, "rgb_dim": 1024, "audio_dim": 128, "train_frames": 6, "max_frames": 300}
IMAGE_SPEC = {"kind": "image", "size": 16}
CLIP_CLASSES, FEAT_CLASSES, IMAGE_CLASSES = 5, 10, 4


# ----------------------------------------------------------------------------------------------------------- data


def _clip_bytes(num_frames: int, seed: int, width: int = 48, height: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):  # a texture sliding right one pixel per frame
            frame = av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _write(folder, kind: str, samples: list[dict], *, shard_size: int, num_classes: int) -> None:
    with DatasetWriter(folder, kind=kind, converter={"name": "test_loader"}, shard_size=shard_size) as w:
        for s in samples:
            w.write(s)
        w.commit(num_classes=num_classes, label_names=None)


def _clip_samples(count: int, *, garbage: tuple[int, ...] = (), bad_label: tuple[int, ...] = ()) -> list[dict]:
    samples = []
    for i in range(count):
        n = 12 + 6 * (i % 4)  # 12, 18, 24, 30 frames: the 12-frame ones are shorter than an 8 x stride-2 window
        video = b"this is not a video " * 20 if i in garbage else _clip_bytes(n, seed=i)
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
    if a.keys() != b.keys() or a["ids"] != b["ids"]:
        return False
    return all(torch.equal(a[k], b[k]) for k in a if k != "ids")


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
    # clips cross the DataLoader as bytes (a quarter of the shared memory); to_model_input finishes them
    assert batch["inputs"].shape == (3, 3, 8, 16, 16) and batch["inputs"].dtype == torch.uint8
    assert batch["target"].dtype == torch.int64 and batch["target"].shape == (3,)
    assert "lengths" not in batch and len(batch["ids"]) == 3
    x = to_model_input(batch["inputs"])
    assert x.dtype == torch.float32
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
            assert stream.aggregate == "first"
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
        b, c, t, h, w = batch["inputs"].shape
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
            assert batch["inputs"].shape[1:] == (3, 8, 16, 16)
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
    """Record the keywords every call of loader.<name> gets (workers=0: everything runs in this process)."""
    real, calls = getattr(loader, name), []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, name, spy)
    return calls


@pytest.mark.parametrize("mode", ["full", "clips"])
def test_clip_eval_runs_at_the_configured_short_side(data, monkeypatch, mode):
    cfg = _cfg(data, short_side=(20, 24))  # crop 16: the old evaluation decoded at 16
    for ecfg, short, crop in [
        (EvalConfig(mode=mode, num_clips=2, batch_size=4, max_frames=20), 20, 16),  # default: data.short_side[0]
        (EvalConfig(mode=mode, num_clips=2, batch_size=4, max_frames=20, short_side=22, crop_size=18), 22, 18),
    ]:
        decoded, transforms = _spy(monkeypatch, "decode_frames"), _spy(monkeypatch, "ClipEvalTransform")
        batches = list(_eval(cfg, ecfg, 0, 1).batches())
        assert {c["short_side"] for c in decoded} == {short}
        assert {(t["short_side"], t["crop_size"]) for t in transforms} == {(short, crop)}
        assert all(b["inputs"].shape[-2:] == (crop, crop) for b in batches)
        monkeypatch.undo()
    # the views are those of ClipEvalTransform at that scale, bit for bit
    ecfg = EvalConfig(mode=mode, num_clips=2, batch_size=4, max_frames=20, short_side=22, crop_size=18)
    batch = next(iter(_eval(cfg, ecfg, 0, 1).batches()))
    sample = schema.decode_video_sample(next(s for s in _clip_samples(24) if s["__key__"] == batch["ids"][0]))
    if mode == "full":
        indices = list(range(0, sample.num_frames, cfg.frame_stride))[:20]
    else:
        indices = loader.uniform_clips(sample.num_frames, cfg.frames, cfg.frame_stride, 2)[0]
    frames = loader.decode_frames(sample.video, indices, short_side=22)
    views = loader.ClipEvalTransform(short_side=22, crop_size=18, num_crops=1 if mode == "full" else 3)(frames)
    assert batch["inputs"].dtype == torch.uint8
    assert torch.equal(to_model_input(batch["inputs"][:1])[0], views[0])  # the float transform's numbers exactly


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
    decoded, transforms = _spy(monkeypatch, "decode_frames"), _spy(monkeypatch, "ClipTrainTransform")
    list(_train(default).batches(0, 0))
    assert default.clip_crop == "scale_jitter"
    assert {t.get("crop", "scale_jitter") for t in transforms} == {"scale_jitter"}
    assert {c["short_side"] for c in decoded} <= set(range(16, 25))  # scale jitter inside the decoder
    monkeypatch.undo()

    cfg = _cfg(data, samples_per_epoch=3, clip_crop="resized_crop", crop_scale=(0.3, 0.9), crop_ratio=(0.5, 2.0))
    decoded, transforms = _spy(monkeypatch, "decode_frames"), _spy(monkeypatch, "ClipTrainTransform")
    a = list(_train(cfg).batches(0, 0))
    assert {(t["crop"], t["scale"], t["ratio"], t["crop_size"]) for t in transforms} == {
        ("resized_crop", (0.3, 0.9), (0.5, 2.0), 16)
    }
    assert {c["short_side"] for c in decoded} == {24}  # decoded at the top of data.short_side
    monkeypatch.undo()
    assert a[0]["inputs"].shape == (3, 3, 8, 16, 16)
    assert _all_same(a, list(_train(cfg).batches(0, 0)))  # still a pure function of the seed
    assert not torch.equal(a[0]["inputs"], next(iter(_train(default).batches(0, 0)))["inputs"])


def test_image_crop_ranges_reach_the_train_transform(data, monkeypatch):
    calls = _spy(monkeypatch, "ImageTrainTransform")
    list(_train(_cfg(data, "image", samples_per_epoch=4), batch=4).batches(0, 0))
    assert {(c["scale"], c["ratio"]) for c in calls} == {((0.08, 1.0), (3 / 4, 4 / 3))}  # the defaults: as before
    calls.clear()
    list(_train(_cfg(data, "image", samples_per_epoch=4, crop_scale=(0.5, 1.0), crop_ratio=(1.0, 1.0)), batch=4).batches(0, 0))
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

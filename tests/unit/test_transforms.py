"""Clip and image transforms: determinism under a seed, geometry in bounds, exact flips, hand-checked numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from video_ens.data import transforms as tf


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clip(t: int = 4, h: int = 40, w: int = 52, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (t, h, w, 3), generator=_gen(seed), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Frame sampling


def test_sample_window_is_in_range_with_the_given_stride():
    rng = _gen(0)
    for num_frames, clip_len, stride in [(300, 16, 2), (64, 64, 1), (100, 8, 4), (65, 32, 2)]:
        for _ in range(50):
            indices = tf.sample_window(num_frames, clip_len, stride, rng)
            assert len(indices) == clip_len
            assert all(0 <= i < num_frames for i in indices)
            assert all(b - a == stride for a, b in zip(indices, indices[1:], strict=False))


def test_sample_window_start_covers_every_position():
    rng = _gen(1)
    starts = {tf.sample_window(20, 4, 2, rng)[0] for _ in range(400)}
    assert starts == set(range(20 - 7 + 1))  # a window spans (4 - 1) * 2 + 1 = 7 frames


def test_short_video_loops_or_repeats_the_last_frame():
    rng = _gen(0)
    assert tf.sample_window(5, 8, 1, rng) == [0, 1, 2, 3, 4, 0, 1, 2]
    assert tf.sample_window(5, 8, 1, rng, pad="repeat_last") == [0, 1, 2, 3, 4, 4, 4, 4]
    assert tf.sample_window(5, 4, 2, rng) == [0, 2, 4, 1]
    with pytest.raises(ValueError, match="pad"):
        tf.sample_window(5, 8, 1, rng, pad="mirror")


def test_sample_window_is_deterministic_and_takes_numpy_generators():
    a = [tf.sample_window(1000, 8, 2, _gen(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert tf.sample_window(1000, 8, 2, _gen(7)) != tf.sample_window(1000, 8, 2, _gen(8))
    n1 = tf.sample_window(1000, 8, 2, np.random.default_rng(3))
    n2 = tf.sample_window(1000, 8, 2, np.random.default_rng(3))
    assert n1 == n2 and all(0 <= i < 1000 for i in n1)


def test_uniform_clips_cover_the_video_evenly():
    clips = tf.uniform_clips(100, 8, 1, 10)
    # Starts are round(k * 92 / 9): 0, 10.2, 20.4, 30.7, 40.9, 51.1, 61.3, 71.6, 81.8, 92.
    assert [c[0] for c in clips] == [0, 10, 20, 31, 41, 51, 61, 72, 82, 92]
    assert clips[-1][-1] == 99  # the last clip ends on the last frame
    assert all(c == list(range(c[0], c[0] + 8)) for c in clips)
    # One clip sits in the middle; with stride 2 a clip spans 15 frames.
    assert tf.uniform_clips(100, 8, 2, 1) == [list(range(42, 57, 2))]
    # A video shorter than one clip: every clip is the same padded clip.
    assert tf.uniform_clips(5, 8, 1, 3) == [[0, 1, 2, 3, 4, 0, 1, 2]] * 3


# --------------------------------------------------------------------------------------------------------------------
# Geometry


def test_random_crop_boxes_stay_inside():
    rng = _gen(0)
    for height, width, size in [(40, 52, 32), (32, 32, 32), (300, 200, 224 - 100)]:
        for _ in range(200):
            top, left, h, w = tf.random_crop_box(height, width, size, rng)
            assert (h, w) == (size, size) and 0 <= top <= height - size and 0 <= left <= width - size
    with pytest.raises(ValueError, match="exceeds"):
        tf.random_crop_box(20, 40, 32, rng)


def test_random_resized_crop_boxes_stay_inside_and_respect_scale():
    rng = _gen(0)
    for height, width in [(240, 320), (50, 400), (400, 50), (7, 9)]:
        for _ in range(200):
            top, left, h, w = tf.random_resized_crop_box(height, width, rng, scale=(0.2, 1.0))
            assert h >= 1 and w >= 1 and top >= 0 and left >= 0
            assert top + h <= height and left + w <= width
    # On a roomy picture the draws succeed: area fraction within scale (up to rounding), aspect within ratio.
    for _ in range(200):
        _, _, h, w = tf.random_resized_crop_box(240, 320, rng, scale=(0.3, 0.6))
        assert 0.3 - 0.02 <= h * w / (240 * 320) <= 0.6 + 0.02
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_random_resized_crop_falls_back_to_a_central_box():
    # A 10:1 strip can never hold a 3:4..4:3 box of >= 90% of its area: the fallback is the central 4:3 box,
    # 20 high and round(20 * 4 / 3) = 27 wide, at left (200 - 27) // 2 = 86.
    assert tf.random_resized_crop_box(20, 200, _gen(0), scale=(0.9, 1.0)) == (0, 86, 20, 27)


def test_three_crops_run_along_the_long_side():
    assert tf.three_crop_boxes(256, 340, 256) == [(0, 0, 256, 256), (0, 42, 256, 256), (0, 84, 256, 256)]
    assert tf.three_crop_boxes(340, 256, 224) == [(0, 16, 224, 224), (58, 16, 224, 224), (116, 16, 224, 224)]
    assert tf.center_crop_box(256, 340, 224) == (16, 58, 224, 224)


def test_hflip_is_an_exact_mirror():
    x = tf.to_float(_clip())
    flipped = tf.hflip(x)
    width = x.shape[-1]
    for col in range(width):
        assert torch.equal(flipped[..., col], x[..., width - 1 - col])
    assert torch.equal(tf.hflip(flipped), x)


def test_resize_short_side_keeps_aspect_and_constant_pictures():
    x = torch.full((2, 3, 48, 64), 0.25)
    y = tf.resize_short_side(x, 24)
    assert y.shape == (2, 3, 24, 32)
    assert torch.allclose(y, torch.full_like(y, 0.25))  # antialiased bilinear weights sum to one
    assert tf.resize_short_side(torch.zeros(1, 3, 64, 48), 36).shape == (1, 3, 48, 36)


# --------------------------------------------------------------------------------------------------------------------
# Colour and normalisation


def test_normalisation_hand_checked():
    pixel = torch.tensor([[[255, 0, 128]]], dtype=torch.uint8)  # (H=1, W=1, 3)
    out = tf.normalize(tf.to_float(pixel), tf.IMAGE_MEAN, tf.IMAGE_STD)[0, :, 0, 0]
    # (1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128/255 - 0.406) / 0.225
    expected = torch.tensor([2.248908, -2.035714, 0.426492])
    assert torch.allclose(out, expected, atol=1e-5)
    grey = tf.normalize(torch.full((1, 3, 1, 1), 0.9), (0.45,) * 3, (0.225,) * 3)
    assert torch.allclose(grey, torch.full_like(grey, 2.0))


def test_colour_changes_hand_checked():
    x = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    assert torch.allclose(tf.adjust_colour(x, 1.5, 1.0, 1.0).flatten(), torch.tensor([0.3, 0.6, 0.9]))
    grey = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6  # 0.3630
    desaturated = tf.adjust_colour(x, 1.0, 1.0, 0.0).flatten()
    assert torch.allclose(desaturated, torch.full((3,), grey))
    # Contrast 0.5 halves every distance to the mean grey of the clip (one pixel here: its own grey).
    assert torch.allclose(tf.adjust_colour(x, 1.0, 0.5, 1.0).flatten(), (x.flatten() - grey) * 0.5 + grey)
    assert torch.equal(tf.adjust_colour(x, 1.0, 1.0, 1.0), x)


def test_colour_jitter_is_identical_across_frames():
    frame = _clip(t=1)
    clip = frame.expand(5, -1, -1, -1).contiguous()
    out = tf.ClipTrainTransform(crop_size=32, short_side_range=(40, 48), colour=tf.ColourJitter(0.4, 0.4, 0.4))(
        clip, _gen(3)
    )
    assert out.shape == (3, 5, 32, 32)
    for t in range(1, 5):
        assert torch.equal(out[:, t], out[:, 0])


def test_colour_jitter_rejects_out_of_range_strength():
    with pytest.raises(ValueError, match="brightness"):
        tf.ColourJitter(brightness=1.5)


# --------------------------------------------------------------------------------------------------------------------
# Pipelines


CLIP_TRAIN = [
    tf.ClipTrainTransform(crop_size=32, short_side_range=(40, 56), colour=tf.ColourJitter(0.3, 0.3, 0.3)),
    tf.ClipTrainTransform(crop_size=32, crop="resized_crop", colour=tf.ColourJitter(0.3, 0.3, 0.3)),
]


@pytest.mark.parametrize("transform", CLIP_TRAIN, ids=["scale_jitter", "resized_crop"])
def test_clip_train_transform_is_deterministic_under_a_seed(transform):
    clip = _clip()
    a = transform(clip, _gen(11))
    b = transform(clip, _gen(11))
    assert a.dtype == torch.float32 and a.shape == (3, 4, 32, 32)
    assert torch.equal(a, b)
    others = [transform(clip, _gen(seed)) for seed in range(12, 16)]
    assert all(not torch.equal(a, o) for o in others)


def test_clip_train_transform_takes_numpy_generators():
    transform = CLIP_TRAIN[0]
    clip = _clip()
    a = transform(clip, np.random.default_rng(5))
    assert torch.equal(a, transform(clip, np.random.default_rng(5)))


def test_clip_train_without_randomness_is_resize_crop_normalise():
    # Short side range fixed at the picture's own short side and no flip or colour: only the crop position is random.
    clip = _clip(h=40, w=52)
    transform = tf.ClipTrainTransform(crop_size=40, short_side_range=(40, 40), flip=False)
    out = transform(clip, _gen(0))
    x = tf.normalize(tf.to_float(clip), tf.VIDEO_MEAN, tf.VIDEO_STD)  # (T, 3, 40, 52)
    lefts = [left for left in range(13) if torch.allclose(out, x[..., left : left + 40].permute(1, 0, 2, 3))]
    assert len(lefts) == 1


def test_clip_resized_crop_is_the_box_resized_to_the_crop():
    """The box is cut from the uint8 frames before conversion: the same numbers as converting the whole clip."""
    clip = _clip(t=3, h=40, w=52)
    transform = tf.ClipTrainTransform(crop_size=24, crop="resized_crop", scale=(0.2, 0.7), ratio=(0.6, 1.6), flip=False)
    for seed in range(5):
        out = transform(clip, _gen(seed))
        box = tf.random_resized_crop_box(40, 52, _gen(seed), scale=(0.2, 0.7), ratio=(0.6, 1.6))
        x = tf.resize(tf.crop(tf.to_float(clip), box), 24, 24)
        assert torch.equal(out, tf.normalize(x, tf.VIDEO_MEAN, tf.VIDEO_STD).permute(1, 0, 2, 3))


@pytest.mark.parametrize("kw", [dict(scale=(0.5, 0.2)), dict(scale=(0.1, 1.5)), dict(ratio=(0.0, 1.0))])
def test_clip_resized_crop_rejects_impossible_ranges(kw):
    with pytest.raises(ValueError, match="scale min <= max <= 1"):
        tf.ClipTrainTransform(crop_size=24, crop="resized_crop", **kw)


def test_clip_resized_crop_still_checks_its_input():
    with pytest.raises(ValueError, match="uint8"):
        tf.ClipTrainTransform(crop_size=24, crop="resized_crop")(torch.zeros(2, 30, 30, 3), _gen(0))


def test_clip_eval_views():
    clip = _clip(t=3, h=48, w=64)
    # at the stored short side the views are crops of the stored pixels
    one = tf.ClipEvalTransform(short_side=48, crop_size=48)(clip)
    three = tf.ClipEvalTransform(short_side=48, crop_size=48, num_crops=3)(clip)
    assert one.shape == (1, 3, 3, 48, 48) and three.shape == (3, 3, 3, 48, 48)
    assert torch.equal(three[1], one[0])  # the middle of the three crops is the centre crop
    full = tf.normalize(tf.to_float(clip), tf.VIDEO_MEAN, tf.VIDEO_STD)  # (3, 3, 48, 64)
    assert torch.equal(one[0], full[..., 8:56].permute(1, 0, 2, 3))
    assert torch.equal(three[0], full[..., :48].permute(1, 0, 2, 3))
    assert torch.equal(three[2], full[..., -48:].permute(1, 0, 2, 3))
    # at short side 32 (scale 2/3) a 32-pixel view is a 48-pixel box of the stored frames, resized to 32
    spec = tf.ClipEvalTransform(short_side=32, crop_size=32, num_crops=3)
    assert spec.boxes(48, 64) == [(0, 0, 48, 48), (0, 8, 48, 48), (0, 16, 48, 48)]  # scaled: 32 x 43, lefts 0, 5, 11
    views = spec(clip)
    for view, (_, left, _, _) in zip(views, spec.boxes(48, 64), strict=True):
        expected = tf.normalize(
            tf.resize(tf.to_float(clip[:, :, left : left + 48]), 32, 32), tf.VIDEO_MEAN, tf.VIDEO_STD
        )
        assert torch.equal(view, expected.permute(1, 0, 2, 3))
    with pytest.raises(ValueError, match="num_crops"):
        tf.ClipEvalTransform(num_crops=10)


def test_boxes_map_from_the_scaled_picture_to_stored_pixels():
    # factor 1: the box as it is; otherwise side and corner scaled and rounded, and kept inside the picture
    assert tf._stored_box((3, 5, 16, 16), 1.0, 40, 52) == (3, 5, 16, 16)
    assert tf._stored_box((10, 20, 32, 32), 40 / 48, 40, 52) == (8, 17, 27, 27)  # 26.67 -> 27, 8.33 -> 8, 16.7 -> 17
    assert tf._stored_box((16, 30, 32, 32), 40 / 48, 40, 52) == (13, 25, 27, 27)
    assert tf._stored_box((0, 60, 32, 32), 40 / 48, 40, 52) == (0, 25, 27, 27)  # past the right edge: clamped
    assert tf._scaled_size(40, 52, 48) == (48, 62) and tf._scaled_size(52, 40, 48) == (62, 48)


def test_scale_jitter_draws_the_short_side_then_the_position_at_that_scale():
    """`draw` consumes the generator in its documented order: short side, top and left at that scale (mapped to
    stored pixels), flip, colour; `__call__` applies exactly what `draw` gives."""
    spec = tf.ClipTrainTransform(crop_size=32, short_side_range=(40, 56), colour=tf.ColourJitter(0.4, 0.4, 0.4))
    clip = _clip(h=40, w=52)
    for seed in range(6):
        rng = _gen(seed)
        short = tf._randint(rng, 40, 56)
        scaled = tf.random_crop_box(*tf._scaled_size(40, 52, short), 32, rng)
        flip = tf._uniform(rng, 0.0, 1.0) < 0.5
        colour = spec.colour.draw(rng)
        augment = spec.draw(40, 52, _gen(seed))
        assert augment == tf.ClipAugment(tf._stored_box(scaled, 40 / short, 40, 52), flip, colour)
        assert augment.box[2] == round(32 * 40 / short)  # the crop of that scale, in stored pixels
        assert torch.equal(spec(clip, _gen(seed)), tf.apply_clip(clip, augment, 32))


def test_image_transforms():
    image = _clip(t=1)[0]  # (40, 52, 3)
    train = tf.ImageTrainTransform(crop_size=24)
    a = train(image, _gen(0))
    assert a.shape == (3, 24, 24) and torch.equal(a, train(image, _gen(0)))
    assert not torch.equal(a, train(image, _gen(1)))
    evaluated = tf.ImageEvalTransform(short_side=32, crop_size=28)(image)
    assert evaluated.shape == (3, 28, 28)
    scaled = tf.resize_short_side(tf.to_float(image), 32)  # (1, 3, 32, 42)
    expected = tf.normalize(scaled[..., 2:30, 7:35], tf.IMAGE_MEAN, tf.IMAGE_STD)[0]
    assert torch.equal(evaluated, expected)


def test_inputs_must_be_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        tf.to_float(torch.zeros(4, 8, 8, 3))
    with pytest.raises(ValueError, match="uint8"):
        tf.to_float(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))


def _padded(clips: list[torch.Tensor], augments: list[tf.ClipAugment]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loader hands over: each clip's box at the top left of a slot as large as the largest box."""
    height = max(a.box[2] for a in augments)
    width = max(a.box[3] for a in augments)
    frames = torch.zeros((len(clips), clips[0].shape[0], height, width, 3), dtype=torch.uint8)
    for b, (clip, a) in enumerate(zip(clips, augments, strict=True)):
        top, left, h, w = a.box
        frames[b, :, :h, :w] = clip[:, top : top + h, left : left + w]
    return frames, torch.tensor([a.box[2:] for a in augments])


def test_device_step_equals_the_cpu_reference():
    """finish_clips (the batched step the training device runs) gives each clip the numbers of apply_clip (the CPU
    reference, step by step) for the same parameters: boxes smaller and larger than the crop, flips, colour; well
    within half a grey level."""
    half_level = 0.5 / 255 / min(tf.VIDEO_STD)
    specs = [
        tf.ClipTrainTransform(crop_size=32, short_side_range=(32, 64), colour=tf.ColourJitter(0.4, 0.4, 0.4)),
        tf.ClipTrainTransform(crop_size=32, crop="resized_crop", colour=tf.ColourJitter(0.4, 0.4, 0.4)),
    ]
    for spec in specs:
        clips = [_clip(t=5, h=40 + 4 * b, w=52 - 2 * b, seed=b) for b in range(6)]
        augments = [spec.draw(*c.shape[1:3], _gen(10 + b)) for b, c in enumerate(clips)]
        assert {a.flip for a in augments} == {True, False}
        frames, extent = _padded(clips, augments)
        got = tf.finish_clips(
            frames,
            extent,
            size=32,
            flip=torch.tensor([a.flip for a in augments]),
            colour=torch.tensor([a.colour for a in augments]),
        )
        assert got.shape == (6, 3, 5, 32, 32) and got.dtype == torch.float32
        for b, (clip, augment) in enumerate(zip(clips, augments, strict=True)):
            err = (got[b] - tf.apply_clip(clip, augment, 32)).abs().max().item()
            assert err < half_level / 100, (spec.crop, b, err)


def test_device_step_without_resize_or_jitter_is_the_normalised_bytes():
    clips = [_clip(t=3, seed=s) for s in range(2)]
    augments = [tf.ClipAugment((4, 7, 32, 32)), tf.ClipAugment((0, 20, 32, 32))]
    frames, extent = _padded(clips, augments)
    batch = {"inputs": frames, "extent": extent, "crop_size": 32}
    got = tf.to_model_input(batch)
    expected = (frames.permute(0, 4, 1, 2, 3).float() / 255 - 0.45) / 0.225  # (B, 3, T, 32, 32)
    assert torch.equal(got, expected)
    x = torch.randn(2, 3, 5, 5)
    assert tf.to_model_input({"inputs": x}) is x  # features and images leave the workers finished
    with pytest.raises(ValueError, match="uint8"):
        tf.finish_clips(frames.float(), extent, size=32)

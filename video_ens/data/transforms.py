"""Clip and image augmentation in plain torch.

Clips are augmented in two halves. The loader's workers decode frames at their stored size and cut one box per
clip (`ClipTrainTransform.draw` picks it, with the flip and colour factors, as a `ClipAugment`); the training device
then resizes every box of a micro-batch to the crop size, flips, jitters and normalises them in one batched step
(`finish_clips`, reached through `to_model_input`). Scaling whole frames on the CPU cost more than decoding them
(environment.md: one ffmpeg thread converts a 602x256 clip at ~1900 frames/s, at ~930 with a bilinear scale to 288),
and the box is at most a crop's worth of pixels. `apply_clip` is the same augmentation of one clip on the CPU: the
reference the batched step is tested against, and what `ClipTrainTransform.__call__` runs.

Images arrive as (H, W, 3) uint8 and leave the workers as normalised float (3, H, W). torchvision is not used: it
is not installed here and PyPI's build fails against this torch. Resizing is `F.interpolate(mode="bilinear",
antialias=True)` on float, which matches torchvision's antialiased resize.

Every random choice draws from a generator passed in by the caller (a `torch.Generator`, or a numpy `Generator`),
never from global state, so an augmentation is reproducible from a seed; the loader derives that seed from rank,
epoch, micro-batch and slot. A clip's frames always share one crop, one flip and one colour change: the model must
see motion, not per-frame jitter.

Frame sampling (which indices to decode) lives here too, since it is decided before decoding:
`sample_window` for training and `uniform_clips` for K-clip evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Kinetics clips (PySlowFast's defaults) and ImageNet images, as fractions of 255.
VIDEO_MEAN = (0.45, 0.45, 0.45)
VIDEO_STD = (0.225, 0.225, 0.225)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

# ITU-R BT.601 luma weights: the grey image behind contrast and saturation changes (torchvision uses the same).
_LUMA = (0.299, 0.587, 0.114)

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels


# --------------------------------------------------------------------------------------------------------------------
# Randomness from an explicit generator


def _uniform(rng: Any, low: float, high: float) -> float:
    if isinstance(rng, torch.Generator):
        return low + (high - low) * torch.rand((), generator=rng).item()
    return float(rng.uniform(low, high))  # numpy Generator


def _randint(rng: Any, low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included."""
    if isinstance(rng, torch.Generator):
        return int(torch.randint(low, high + 1, (), generator=rng).item())
    return int(rng.integers(low, high + 1))


# --------------------------------------------------------------------------------------------------------------------
# Which frames to decode


def _span(clip_len: int, stride: int) -> int:
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len and stride must be >= 1, got clip_len={clip_len}, stride={stride}")
    return (clip_len - 1) * stride + 1


def _window(start: int, num_frames: int, clip_len: int, stride: int, pad: str) -> list[int]:
    indices = [start + k * stride for k in range(clip_len)]
    if pad == "loop":
        return [i % num_frames for i in indices]
    if pad == "repeat_last":
        return [min(i, num_frames - 1) for i in indices]
    raise ValueError(f"pad must be 'loop' or 'repeat_last', got {pad!r}")


def sample_window(num_frames: int, clip_len: int, stride: int, rng: Any, *, pad: str = "loop") -> list[int]:
    """Indices of one training clip: `clip_len` frames `stride` apart, starting at a uniformly random frame.

    A window spans (clip_len - 1) * stride + 1 frames. A video shorter than that starts at frame 0 and is padded:
    pad="loop" wraps around to the start (motion stays natural apart from one cut), pad="repeat_last" holds the last
    frame (no cut, but the clip freezes). Either way the clip always has `clip_len` frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    slack = num_frames - _span(clip_len, stride)
    start = _randint(rng, 0, slack) if slack > 0 else 0
    return _window(start, num_frames, clip_len, stride, pad)


def shifted_window(window: list[int], lowest: int, num_frames: int, stride: int, rng: Any) -> list[int]:
    """Another training window like `window` (same length and stride) for a repeated sample of the same decode: its
    start drawn uniformly from [lowest, window[0]], where `lowest` is the first frame the decoder has to decode for
    `window` anyway (the keyframe before it), so the shifted window costs no further decoding. A window that loops
    (the video is shorter than its span) is returned as it is."""
    clip_len = len(window)
    if num_frames < _span(clip_len, stride):
        return list(window)
    start = _randint(rng, min(lowest, window[0]), window[0])
    return _window(start, num_frames, clip_len, stride, "loop")


def uniform_clips(num_frames: int, clip_len: int, stride: int, num_clips: int, *, pad: str = "loop") -> list[list[int]]:
    """Indices of `num_clips` evaluation clips spread evenly: the first starts at frame 0, the last ends at the end.

    Clip k starts at round(k * (num_frames - span) / (num_clips - 1)); a single clip is centred. Clips overlap when
    the video is short, and a video shorter than one span gives `num_clips` copies of the padded clip (see
    `sample_window` for `pad`).
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    slack = max(num_frames - _span(clip_len, stride), 0)
    if num_clips == 1:
        starts = [slack // 2]
    else:
        starts = [math.floor(k * slack / (num_clips - 1) + 0.5) for k in range(num_clips)]
    return [_window(start, num_frames, clip_len, stride, pad) for start in starts]


# --------------------------------------------------------------------------------------------------------------------
# Layout and geometry. Internally frames are float (N, 3, H, W) in [0, 1]: N = T for a clip, 1 for an image.


def _check_uint8(frames: torch.Tensor) -> None:
    if frames.dtype != torch.uint8 or frames.dim() not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 (T, H, W, 3) or (H, W, 3) frames, got {frames.dtype} {tuple(frames.shape)}")


def to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) or (H, W, 3) -> float (T, 3, H, W) or (1, 3, H, W) in [0, 1]."""
    _check_uint8(frames)
    frames = frames if frames.dim() == 4 else frames.unsqueeze(0)
    return frames.permute(0, 3, 1, 2).float().div_(255.0)


def resize(x: torch.Tensor, height: int, width: int, *, plain_enlarge: bool = False) -> torch.Tensor:
    """Bilinear resize of float (N, 3, H, W), antialiased so downscaling does not alias.

    plain_enlarge: when the picture only grows, use the plain bilinear kernel. Enlarging needs no antialiasing (the
    filter's support is then the plain bilinear one: the same weights up to float rounding, ~5e-7 here), and the
    plain kernel is ~3x faster on a CPU for channels-last input (a 64 x 200 x 200 box to 224: 31 ms against 93 ms).
    The device step of clips uses it; image transforms keep the antialiased kernel, and their numbers.
    """
    if x.shape[-2:] == (height, width):
        return x
    antialias = not plain_enlarge or height < x.shape[-2] or width < x.shape[-1]
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=antialias, align_corners=False)


def resize_short_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """Scale float (N, 3, H, W) so its shorter side is `size` pixels, keeping the aspect ratio."""
    height, width = x.shape[-2:]
    if height <= width:
        return resize(x, size, max(1, math.floor(width * size / height + 0.5)))
    return resize(x, max(1, math.floor(height * size / width + 0.5)), size)


def crop(x: torch.Tensor, box: Box) -> torch.Tensor:
    top, left, height, width = box
    return x[..., top : top + height, left : left + width]


def random_crop_box(height: int, width: int, size: int, rng: Any) -> Box:
    """A size x size box at a uniformly random position inside a height x width picture."""
    if size > height or size > width:
        raise ValueError(f"crop size {size} exceeds the {height}x{width} picture: scale it up first")
    return _randint(rng, 0, height - size), _randint(rng, 0, width - size), size, size


def center_crop_box(height: int, width: int, size: int) -> Box:
    if size > height or size > width:
        raise ValueError(f"crop size {size} exceeds the {height}x{width} picture: scale it up first")
    return (height - size) // 2, (width - size) // 2, size, size


def random_resized_crop_box(
    height: int,
    width: int,
    rng: Any,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> Box:
    """Inception-style box: area a uniform fraction `scale` of the picture, aspect w/h log-uniform in `ratio`.

    Up to `attempts` draws; when none fits (extreme ratios on a narrow picture) fall back to the largest central box
    whose aspect lies within `ratio`, as torchvision does.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * _uniform(rng, *scale)
        aspect = math.exp(_uniform(rng, log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(rng, 0, height - h), _randint(rng, 0, width - w), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def three_crop_boxes(height: int, width: int, size: int) -> list[Box]:
    """Three size x size boxes along the long side: left, centre, right (or top, centre, bottom), as PySlowFast."""
    top, left, _, _ = center_crop_box(height, width, size)
    if width >= height:
        return [(top, 0, size, size), (top, left, size, size), (top, width - size, size, size)]
    return [(0, left, size, size), (top, left, size, size), (height - size, left, size, size)]


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right (the last axis is width)."""
    return x.flip(-1)


# --------------------------------------------------------------------------------------------------------------------
# Colour and normalisation


@dataclass(frozen=True)
class ColourJitter:
    """Random brightness, contrast and saturation factors, each drawn from [1 - s, 1 + s] once per clip.

    Applied in that fixed order to float (N, 3, H, W) in [0, 1], clamping to [0, 1] after each step. Contrast pulls
    towards the mean grey of the whole clip (not of each frame), so every frame gets exactly the same change.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0

    def __post_init__(self) -> None:
        for field in ("brightness", "contrast", "saturation"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ColourJitter.{field} must be in [0, 1] (factor range 1 +- value), got {value}")

    def draw(self, rng: Any) -> tuple[float, float, float]:
        """(brightness, contrast, saturation) factors; a strength of 0 gives 1.0 and draws nothing."""
        b, c, s = (
            _uniform(rng, 1 - v, 1 + v) if v > 0 else 1.0 for v in (self.brightness, self.contrast, self.saturation)
        )
        return b, c, s

    def __call__(self, x: torch.Tensor, rng: Any) -> torch.Tensor:
        return adjust_colour(x, *self.draw(rng))


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma of float (..., 3, H, W): (..., 1, H, W)."""
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * weights).sum(dim=-3, keepdim=True)


def adjust_colour(x: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """Scale brightness, contrast (around the clip's mean grey) and saturation of float (N, 3, H, W) in [0, 1]."""
    x = x.clone()
    if brightness != 1.0:
        x.mul_(brightness).clamp_(0.0, 1.0)
    if contrast != 1.0:
        mean = _grey(x).mean()
        x.sub_(mean).mul_(contrast).add_(mean).clamp_(0.0, 1.0)
    if saturation != 1.0:
        g = _grey(x)
        x.sub_(g).mul_(saturation).add_(g).clamp_(0.0, 1.0)
    return x


def adjust_colour_batch_(
    x: torch.Tensor, factors: torch.Tensor, steps: tuple[bool, bool, bool] = (True, True, True)
) -> torch.Tensor:
    """`adjust_colour` of every clip of float (B, 3, T, H, W) in place, clip b with factors[b] = (brightness,
    contrast, saturation); contrast pulls towards each clip's own mean grey. `steps` switches off the steps no clip
    of the batch uses (all its factors 1), which then leave x bit for bit as it was; a step that runs changes a
    clip whose factor is 1 by float rounding at most. Channel-first, each channel of a clip is one plane, so the grey
    image is three plane operations."""
    view = (x.shape[0],) + (1,) * (x.dim() - 1)
    brightness, contrast, saturation = (factors[:, i].to(x.dtype).view(view) for i in range(3))
    if steps[0]:
        x.mul_(brightness).clamp_(0.0, 1.0)
    if steps[1]:
        mean = _grey_planes(x).mean(dim=tuple(range(1, x.dim() - 1)), keepdim=True).unsqueeze(1)  # (B, 1, 1, 1, 1)
        x.sub_(mean).mul_(contrast).add_(mean).clamp_(0.0, 1.0)
    if steps[2]:
        grey = _grey_planes(x).unsqueeze(1)  # (B, 1, T, H, W)
        x.sub_(grey).mul_(saturation).add_(grey).clamp_(0.0, 1.0)
    return x


def _grey_planes(x: torch.Tensor) -> torch.Tensor:
    """Luma of channel-first float (B, 3, ...): (B, ...), accumulated in one buffer (each out-of-place temporary of
    a 64 x 224 batch is a fresh ~100 MB mapping to fault in on a CPU)."""
    grey = torch.mul(x[:, 0], _LUMA[0])
    grey.add_(x[:, 1], alpha=_LUMA[1])
    return grey.add_(x[:, 2], alpha=_LUMA[2])


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel, for float (..., 3, H, W) in [0, 1]."""
    return normalize_(x.clone(), mean, std)


def normalize_(
    x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], *, channel_dim: int = -3
) -> torch.Tensor:
    """`normalize` in place; `channel_dim` -4 for clips laid out (..., 3, T, H, W)."""
    shape = [3] + [1] * (-channel_dim - 1)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x.sub_(mean_t).div_(std_t)


def _clip_layout(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 0, 2, 3).contiguous()  # (T, 3, H, W) -> (3, T, H, W)


# --------------------------------------------------------------------------------------------------------------------
# Clips: parameters drawn in the loader, pixels worked on the device


@dataclass(frozen=True)
class ClipAugment:
    """One clip view's augmentation: the box cut from the frames at their stored size (top, left, height, width in
    stored pixels), which is resized to the output size; then a left-right flip and colour factors (brightness,
    contrast, saturation; 1.0 leaves a property as it is)."""

    box: Box
    flip: bool = False
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)


def _scaled_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) with the shorter side scaled to `short`, the aspect kept (rounded half up)."""
    if height <= width:
        return short, max(1, math.floor(width * short / height + 0.5))
    return max(1, math.floor(height * short / width + 0.5)), short


def _stored_box(box: Box, factor: float, height: int, width: int) -> Box:
    """A square box given in a picture scaled by 1 / factor, in the pixels of the height x width original: its side
    and position scaled by `factor` and rounded, kept inside the picture. factor 1 returns the box as it is."""
    top, left, size, _ = box
    side = min(max(1, round(size * factor)), height, width)
    return min(round(top * factor), height - side), min(round(left * factor), width - side), side, side


def apply_clip(frames: torch.Tensor, augment: ClipAugment, size: int, mean=VIDEO_MEAN, std=VIDEO_STD) -> torch.Tensor:
    """One clip's augmentation on the CPU, step by step: uint8 (T, H, W, 3) -> float (3, T, size, size). The
    reference of `finish_clips`, which does the same for a whole batch on the device."""
    top, left, height, width = augment.box
    x = to_float(frames[:, top : top + height, left : left + width])  # only the box: (T, 3, h, w)
    x = resize(x, size, size)
    if augment.flip:
        x = hflip(x)
    return _clip_layout(normalize(adjust_colour(x, *augment.colour), mean, std))


def finish_clips(
    frames: torch.Tensor,
    extent: torch.Tensor,
    *,
    size: int,
    flip: torch.Tensor | None = None,
    colour: torch.Tensor | None = None,
    mean=VIDEO_MEAN,
    std=VIDEO_STD,
) -> torch.Tensor:
    """The device half of clip augmentation, for a batch as the loader hands it over.

    frames: uint8 (B, T, Hb, Wb, 3) on the device, clip b's box in frames[b, :, :h, :w] with (h, w) = extent[b]
        (the rest of each slot pads it to the batch's largest box). extent: int (B, 2), on the CPU.
    flip: bool (B,) or None; colour: float (B, 3) factors or None (no change); both on the CPU (the loader's).
    Returns float32 (B, 3, T, size, size), normalised with `mean` / `std`: for each clip the numbers of
    `apply_clip` (up to float rounding of the batched arithmetic).
    """
    if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips (B, T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    batch, steps = frames.shape[:2]
    out = torch.empty((batch, 3, steps, size, size), dtype=torch.float32, device=frames.device)  # (B, 3, T, S, S)
    flips = flip.tolist() if flip is not None else [False] * batch
    for b, (h, w) in enumerate(extent.tolist()):
        box = frames[b, :, :h, :w].permute(0, 3, 1, 2).to(torch.float32)  # (T, 3, h, w), 0-255, channels-last
        box = resize(box, size, size, plain_enlarge=True)
        out[b].copy_((box.flip(-1) if flips[b] else box).transpose(0, 1))
    out.div_(255.0)
    if colour is not None:
        steps_used = tuple((colour != 1.0).any(dim=0).tolist())  # on the CPU: no device sync
        if any(steps_used):
            adjust_colour_batch_(out, colour.to(out.device, non_blocking=True), steps_used)
    return normalize_(out, mean, std, channel_dim=-4)


def to_model_input(batch: dict, device: torch.device | str | None = None) -> torch.Tensor:
    """A loader batch's model input on `device`: clips (batches with "extent") go through `finish_clips` there;
    features and images, which leave the workers finished, are only moved."""
    x = batch["inputs"]
    if device is not None:
        x = x.to(device, non_blocking=True)
    if "extent" not in batch:
        return x
    return finish_clips(
        x, batch["extent"], size=int(batch["crop_size"]), flip=batch.get("flip"), colour=batch.get("colour")
    )


@dataclass(frozen=True)
class ClipTrainTransform:
    """Training augmentation of a clip: `draw` picks it from the frames' stored size; `apply_clip` (one clip, CPU:
    `__call__`) or `finish_clips` (a batch, on the device) applies it.

    crop: "scale_jitter" scales the short side to a random size in `short_side_range` and takes a random square of
        `crop_size` (PySlowFast's Kinetics recipe); in stored pixels that is a square of side crop_size x stored
        short side / drawn short side, resized to crop_size. "resized_crop" takes an Inception-style box (`scale`:
        area fraction range, `ratio`: aspect w/h range) of the stored frames, resized to crop_size. The loader
        selects it with data.clip_crop.
    flip: mirror left-right with probability 0.5. colour: jitter strengths, 0 to switch off.
    """

    crop_size: int = 224
    crop: str = "scale_jitter"
    short_side_range: tuple[int, int] = (256, 320)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    colour: ColourJitter = ColourJitter()
    mean: tuple[float, float, float] = VIDEO_MEAN
    std: tuple[float, float, float] = VIDEO_STD

    def __post_init__(self) -> None:
        if self.crop not in ("scale_jitter", "resized_crop"):
            raise ValueError(f"crop must be 'scale_jitter' or 'resized_crop', got {self.crop!r}")
        low, high = self.short_side_range
        if self.crop == "scale_jitter" and not self.crop_size <= low <= high:
            raise ValueError(f"short_side_range {self.short_side_range} must satisfy crop_size <= min <= max")
        if self.crop == "resized_crop" and not (
            0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1]
        ):
            raise ValueError(f"need 0 < scale min <= max <= 1 and 0 < ratio min <= max, got {self.scale}, {self.ratio}")

    def draw(self, height: int, width: int, rng: Any) -> ClipAugment:
        """The augmentation of one clip stored at height x width. Draws, in this order: the box (scale jitter: the
        short side, then top and left at that scale), the flip, the colour factors."""
        if self.crop == "resized_crop":
            box = random_resized_crop_box(height, width, rng, self.scale, self.ratio)
        else:
            short = _randint(rng, *self.short_side_range)
            scaled = random_crop_box(*_scaled_size(height, width, short), self.crop_size, rng)
            box = _stored_box(scaled, min(height, width) / short, height, width)
        flip = self.flip and _uniform(rng, 0.0, 1.0) < 0.5
        return ClipAugment(box, flip, self.colour.draw(rng))

    def __call__(self, frames: torch.Tensor, rng: Any) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float (3, T, crop_size, crop_size), on the CPU."""
        _check_uint8(frames)
        return apply_clip(frames, self.draw(*frames.shape[1:3], rng), self.crop_size, self.mean, self.std)


@dataclass(frozen=True)
class ClipEvalTransform:
    """Evaluation views of a clip: the short side scaled to `short_side`, then the centre crop (num_crops=1) or
    three crops along the long side (num_crops=3, the "x 3 crops" of 10x3 testing), each crop_size square.

    `boxes` gives the views in stored pixels (the loader cuts them, `finish_clips` resizes them); where short_side
    is the stored short side they are the crops themselves, bit for bit. `__call__` is the CPU reference:
    uint8 (T, H, W, 3) -> float (V, 3, T, crop_size, crop_size), V = num_crops.
    """

    short_side: int = 256
    crop_size: int = 256
    num_crops: int = 1
    mean: tuple[float, float, float] = VIDEO_MEAN
    std: tuple[float, float, float] = VIDEO_STD

    def __post_init__(self) -> None:
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 (centre) or 3 (along the long side), got {self.num_crops}")
        if self.crop_size > self.short_side:
            raise ValueError(f"crop_size {self.crop_size} must not exceed short_side {self.short_side}")

    def boxes(self, height: int, width: int) -> list[Box]:
        """The views' boxes in the pixels of frames stored at height x width."""
        scaled = _scaled_size(height, width, self.short_side)
        if self.num_crops == 1:
            boxes = [center_crop_box(*scaled, self.crop_size)]
        else:
            boxes = three_crop_boxes(*scaled, self.crop_size)
        factor = min(height, width) / self.short_side
        return [_stored_box(box, factor, height, width) for box in boxes]

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        _check_uint8(frames)
        views = [ClipAugment(box) for box in self.boxes(*frames.shape[1:3])]
        return torch.stack([apply_clip(frames, v, self.crop_size, self.mean, self.std) for v in views])


# --------------------------------------------------------------------------------------------------------------------
# Images: augmented in the workers


@dataclass(frozen=True)
class ImageTrainTransform:
    """Training augmentation of an image: uint8 (H, W, 3) -> float (3, crop_size, crop_size).

    Inception-style random resized crop, left-right flip with probability 0.5, colour jitter, normalisation.
    """

    crop_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    colour: ColourJitter = ColourJitter(0.4, 0.4, 0.4)
    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD

    def __call__(self, image: torch.Tensor, rng: Any) -> torch.Tensor:
        x = to_float(image)  # (1, 3, H, W)
        box = random_resized_crop_box(*x.shape[-2:], rng, self.scale, self.ratio)
        x = resize(crop(x, box), self.crop_size, self.crop_size)
        if self.flip and _uniform(rng, 0.0, 1.0) < 0.5:
            x = hflip(x)
        x = self.colour(x, rng)
        return normalize(x, self.mean, self.std)[0]


@dataclass(frozen=True)
class ImageEvalTransform:
    """Evaluation view of an image: short side to `short_side`, centre crop: uint8 (H, W, 3) -> (3, crop, crop).

    The default 256 -> 224 keeps the usual ImageNet crop fraction of 0.875.
    """

    short_side: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = resize_short_side(to_float(image), self.short_side)
        x = crop(x, center_crop_box(*x.shape[-2:], self.crop_size))
        return normalize(x, self.mean, self.std)[0]

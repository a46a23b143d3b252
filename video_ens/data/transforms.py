"""Clip and image augmentation in plain torch: uint8 frames in, normalised float tensors out.

Clips arrive from `decode.decode_frames` as uint8 (T, H, W, 3) and leave as float (3, T, H, W); images arrive as
(H, W, 3) and leave as (3, H, W). torchvision is not used: it is not installed here and PyPI's build fails against
this torch. Resizing is `F.interpolate(mode="bilinear", antialias=True)` on float, which matches torchvision's
antialiased resize.

Every random choice draws from a generator passed in by the caller (a `torch.Generator`, or a numpy `Generator`),
never from global state, so an augmentation is reproducible from a seed; the loader derives that seed from rank,
worker, epoch and sample. A clip's frames always share one crop, one flip and one colour change: the model must see
motion, not per-frame jitter.

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


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of float (N, 3, H, W), antialiased so downscaling does not alias."""
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


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

    def apply_(self, x: torch.Tensor, rng: Any) -> torch.Tensor:
        """`__call__` in place on x, which the caller owns (the same numbers, no full-size temporaries)."""
        return adjust_colour_(x, *self.draw(rng))


def _grey(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)  # (N, 1, H, W)


def adjust_colour(x: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """Scale brightness, contrast (around the clip's mean grey) and saturation of float (N, 3, H, W) in [0, 1]."""
    return adjust_colour_(x.clone(), brightness, contrast, saturation)


def _grey_planes(x: torch.Tensor) -> torch.Tensor:
    """`_grey` of a channel-first (3, ...) tensor, whose channels are whole planes: plane arithmetic."""
    return x[0] * _LUMA[0] + x[1] * _LUMA[1] + x[2] * _LUMA[2]


def adjust_colour_(
    x: torch.Tensor, brightness: float, contrast: float, saturation: float, *, grey=_grey
) -> torch.Tensor:
    """`adjust_colour` in place. The clip pipelines use it: a 64 x 224 x 224 float clip is 38.5 MB, above glibc's
    mmap threshold, so each out-of-place step was a fresh mapping for the kernel to fault in and zero (more system
    than user time; benchmarks/bench_loader.py --mode pipeline). Same operations in the same order: same numbers.
    `grey`: `_grey` for (N, 3, H, W), `_grey_planes` for channel-first (3, T, H, W)."""
    if brightness != 1.0:
        x.mul_(brightness).clamp_(0.0, 1.0)
    if contrast != 1.0:
        mean = grey(x).mean()
        x.sub_(mean).mul_(contrast).add_(mean).clamp_(0.0, 1.0)
    if saturation != 1.0:
        g = grey(x)
        x.sub_(g).mul_(saturation).add_(g).clamp_(0.0, 1.0)
    return x


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel, for float (N, 3, H, W) in [0, 1]."""
    return normalize_(x.clone(), mean, std)


def normalize_(
    x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], *, channel_dim: int = -3
) -> torch.Tensor:
    """`normalize` in place; `channel_dim` -4 for clips laid out (..., 3, T, H, W)."""
    shape = [3] + [1] * (-channel_dim - 1)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x.sub_(mean_t).div_(std_t)


def _to_bytes(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> uint8, rounded to the nearest level (in place on x, which the caller owns)."""
    return x.mul_(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)


def to_model_input(x: torch.Tensor, mean=VIDEO_MEAN, std=VIDEO_STD) -> torch.Tensor:
    """Finish a batch on its device: uint8 clips (B, 3, T, H, W) or views (B, V, 3, T, H, W), as the loader hands
    them over, become float32 normalised with `mean` / `std`, with the same arithmetic as the transforms' own
    normalisation (x / 255, minus the mean, over the std, per channel). Anything else is returned as it is."""
    if x.dtype != torch.uint8:
        return x
    if x.dim() not in (5, 6) or x.shape[-4] != 3:
        raise ValueError(f"expected uint8 clips (B, 3, T, H, W) or (B, V, 3, T, H, W), got {tuple(x.shape)}")
    return normalize_(x.to(torch.float32).div_(255.0), mean, std, channel_dim=-4)


def _clip_layout(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 0, 2, 3).contiguous()  # (T, 3, H, W) -> (3, T, H, W)


# --------------------------------------------------------------------------------------------------------------------
# Pipelines


@dataclass(frozen=True)
class ClipTrainTransform:
    """Training augmentation of a clip: uint8 (T, H, W, 3) -> float (3, T, crop_size, crop_size).

    crop: "scale_jitter" scales the short side to a random size in `short_side_range` and takes a random square of
        `crop_size` (PySlowFast's Kinetics recipe); "resized_crop" takes an Inception-style box (`scale`: area
        fraction range, `ratio`: aspect w/h range) and resizes it to `crop_size` (cheaper: only the box is
        converted to float and resized). The loader selects it with data.clip_crop.
    flip: mirror left-right with probability 0.5. colour: jitter strengths, 0 to switch off.
    uint8_out: return uint8 (3, T, crop, crop) without normalising (the loader's hand-over: a quarter of the bytes
        through the DataLoader's shared memory; `to_model_input` finishes the batch on its device). Pixels touched by
        colour jitter or a resize are rounded back to bytes; an untouched crop is returned as it was decoded.
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
    uint8_out: bool = False

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

    def __call__(self, frames: torch.Tensor, rng: Any) -> torch.Tensor:
        # float (T, 3, crop_size, crop_size), or the uint8 (T, crop, crop, 3) crop when it needs no resize
        x = _train_geometry(frames, self, rng)
        flip = self.flip and _uniform(rng, 0.0, 1.0) < 0.5
        if x.dtype == torch.uint8:
            # Flip the bytes and convert only the crop, straight into the (3, T, H, W) layout the model takes, where
            # each channel is one plane: the grey and normalisation steps are then plane arithmetic. The same
            # numbers as the general path below (tests/unit/test_transforms.py checks it bit for bit).
            planes = (x.flip(-2) if flip else x).permute(3, 0, 1, 2)  # uint8 (3, T, crop, crop) view
            factors = self.colour.draw(rng)
            if self.uint8_out and factors == (1.0, 1.0, 1.0):
                return planes.contiguous()
            x = planes.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
            adjust_colour_(x, *factors, grey=_grey_planes)
            if self.uint8_out:
                return _to_bytes(x)
            return normalize_(x, self.mean, self.std, channel_dim=-4)
        if flip:
            x = hflip(x)
        x = self.colour.apply_(x, rng)  # x is ours: in place from here on
        if self.uint8_out:
            return _to_bytes(_clip_layout(x))
        return _clip_layout(normalize_(x, self.mean, self.std))


@dataclass(frozen=True)
class ClipEvalTransform:
    """Evaluation views of a clip: uint8 (T, H, W, 3) -> float (V, 3, T, crop_size, crop_size), V = num_crops.

    Scales the short side to `short_side`, then takes the centre crop (num_crops=1) or three crops along the long
    side (num_crops=3, the "x 3 crops" of 10x3 testing).
    """

    short_side: int = 256
    crop_size: int = 256
    num_crops: int = 1
    mean: tuple[float, float, float] = VIDEO_MEAN
    std: tuple[float, float, float] = VIDEO_STD
    uint8_out: bool = False  # as ClipTrainTransform's: uint8 views, normalised later by `to_model_input`

    def __post_init__(self) -> None:
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 (centre) or 3 (along the long side), got {self.num_crops}")
        if self.crop_size > self.short_side:
            raise ValueError(f"crop_size {self.crop_size} must not exceed short_side {self.short_side}")

    def _boxes(self, height: int, width: int) -> list[Box]:
        if self.num_crops == 1:
            return [center_crop_box(height, width, self.crop_size)]
        return three_crop_boxes(height, width, self.crop_size)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        _check_uint8(frames)
        if self.uint8_out and min(frames.shape[1:3]) == self.short_side:  # decoded at this size: crop the bytes
            boxes = self._boxes(*frames.shape[1:3])
            return torch.stack([frames[:, t : t + h, left : left + w].permute(3, 0, 1, 2) for t, left, h, w in boxes])
        x = resize_short_side(to_float(frames), self.short_side)  # a fresh tensor
        if self.uint8_out:
            return torch.stack([_to_bytes(_clip_layout(crop(x, box))) for box in self._boxes(*x.shape[-2:])])
        x = normalize_(x, self.mean, self.std)
        return torch.stack([_clip_layout(crop(x, box)) for box in self._boxes(*x.shape[-2:])])


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


def _train_geometry(frames: torch.Tensor, spec: ClipTrainTransform, rng: Any) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (T, 3, crop_size, crop_size), or the uint8 (T, crop, crop, 3) crop when the frames
    are already at the drawn scale. A resized-crop box is cut from the uint8 frames, so only the box is converted to
    float (the same numbers as converting first: the conversion is per pixel)."""
    _check_uint8(frames)
    if spec.crop == "resized_crop":
        top, left, height, width = random_resized_crop_box(*frames.shape[-3:-1], rng, spec.scale, spec.ratio)
        x = to_float(frames[..., top : top + height, left : left + width, :])
        return resize(x, spec.crop_size, spec.crop_size)
    short = _randint(rng, *spec.short_side_range)
    if min(frames.shape[1:3]) == short:  # already at this scale (the loader decodes at it): crop the bytes
        top, left, height, width = random_crop_box(*frames.shape[1:3], spec.crop_size, rng)
        return frames[:, top : top + height, left : left + width]
    x = resize_short_side(to_float(frames), short)
    return crop(x, random_crop_box(*x.shape[-2:], spec.crop_size, rng))

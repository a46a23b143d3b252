"""Recipes: one JSON file per run, loaded strictly into typed sections.

A recipe has a `description` and seven sections, each a dataclass below with a docstring per field and its
default in code: model, data, objective, optim, train, deepspeed, eval. Loading is strict: an unknown key, a value
of the wrong type or an impossible value raises `RecipeError` naming the JSON path (`optim.lr`), the reason and,
for unknown keys, the closest valid key. Command-line overrides (`--set optim.lr=0.1`) are applied to the raw JSON
before validation, so they go through the same checks. `dump_recipe` writes the resolved recipe (defaults filled,
overrides applied); loading that file gives an equal Recipe.

    python -m video_ens.config recipes/demo_kinetics_s3dg_mu2.json --set optim.lr=0.1 [--dump resolved.json]

validates a recipe and prints it resolved, without importing torch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the source, the JSON path and the fix."""


class _FieldError(ValueError):
    """Raised by section checks; the loader prefixes the JSON path of the section."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name = field_name


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise _FieldError(field_name, message)


# --------------------------------------------------------------------------------------------------- model catalogue
#
# The model section is checked against the builders themselves. config sits below video_ens.models in the import
# layers (tests/unit/test_layering.py) and validates without importing torch (launch.sh runs it before any process
# starts, in 0.1 s), so it reads the family modules' source instead of importing them: each module under
# video_ens/models/ with a `build` function and a `PRESETS` dict literal is a family (video_ens.models.MODELS is
# built from the same two). tests/unit/test_config.py checks that this reading agrees with the imported table.
# What only building can tell (a ResNet fork beyond its blocks, kernels="cuda", branch_widths of the wrong length)
# is checked by video_ens.train, which builds the model on the meta device before anything else.

MODEL_FIELDS = ("num_branches", "width_ratio", "fork", "num_classes", "dropout", "conv_init", "conv_init_std")
"""The ModelConfig fields that are builder keywords common to every family (video_ens.models)."""

_MODELS_DIR = Path(__file__).resolve().parent / "models"
_SIMPLE_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


@dataclass(frozen=True)
class ModelFamily:
    """One model family as its module's source declares it."""

    module: str
    """Module name under video_ens.models, e.g. "s3dg"."""
    presets: tuple[str, ...]
    """Its preset names: the keys of its PRESETS dict literal."""
    keywords: dict[str, Any]
    """Every keyword of its `build`, mapped to the type its annotation (or, without one, its default) states, or to
    None where that is not a type config checks (int, float, bool, str, None, tuples and unions of them)."""
    forks: tuple[str, ...] | None
    """The names `build` accepts as fork (the module-level tuple it tests `fork` against); None when it computes
    them (ResNet: from its number of blocks)."""


def _annotation_type(node: ast.expr | None) -> Any:
    """The typing object of a simple annotation (int, float | None, tuple[int, ...]); None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return None
    if isinstance(node, ast.Constant) and node.value is None:
        return type(None)
    if isinstance(node, ast.Name):
        return _SIMPLE_TYPES.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _annotation_type(node.left), _annotation_type(node.right)
        return None if left is None or right is None else typing.Union[left, right]  # noqa: UP007
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "tuple":
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        args: list[Any] = []
        for item in items:
            if isinstance(item, ast.Constant) and item.value is Ellipsis:
                args.append(Ellipsis)
                continue
            tp = _annotation_type(item)
            if tp is None:
                return None
            args.append(tp)
        return tuple[tuple(args)]
    return None


def _default_type(node: ast.expr | None) -> Any:
    try:
        value = ast.literal_eval(node) if node is not None else None
    except ValueError:
        return None
    return type(value) if type(value) in (int, float, bool, str) else None


def _read_family(path: Path) -> ModelFamily | None | bool:
    """The family `path` defines; None when it defines none; False when it has a PRESETS that is no dict literal."""
    tree = ast.parse(path.read_text(), filename=str(path))
    build, presets, constants = None, None, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "build":
            build = node
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for target in targets:
            if not isinstance(target, ast.Name) or node.value is None:
                continue
            if target.id == "PRESETS":
                presets = node.value
            try:
                constants[target.id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    if build is None or presets is None:
        return None
    if not (
        isinstance(presets, ast.Dict)
        and all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in presets.keys)
    ):
        return False
    a = build.args
    positional = a.posonlyargs + a.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    keywords = {}
    for arg, default in [
        *zip(a.args, defaults[len(a.posonlyargs) :], strict=True),
        *zip(a.kwonlyargs, a.kw_defaults, strict=True),
    ]:
        keywords[arg.arg] = _annotation_type(arg.annotation) if arg.annotation is not None else _default_type(default)
    forks = None
    for node in ast.walk(build):  # `if fork not in NAMES:` with NAMES a module-level tuple of strings
        if (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Name)
            and node.left.id == "fork"
            and len(node.ops) == 1
            and isinstance(node.ops[0], ast.NotIn)
            and isinstance(node.comparators[0], ast.Name)
        ):
            names = constants.get(node.comparators[0].id)
            if isinstance(names, tuple) and names and all(isinstance(n, str) for n in names):
                forks = names
    return ModelFamily(path.stem, tuple(k.value for k in presets.keys), keywords, forks)


@functools.cache
def model_families() -> dict[str, ModelFamily] | None:
    """Every model family by module name, read from video_ens/models/*.py without importing it (a few ms, once).

    None when the sources cannot be read that way (not shipped, or a PRESETS that is no dict literal): the recipe
    check then leaves the model section to the builder.
    """
    families = {}
    try:
        for path in sorted(_MODELS_DIR.glob("*.py")):
            family = _read_family(path)
            if family is False:
                return None
            if family is not None:
                families[family.module] = family
    except (OSError, SyntaxError):
        return None
    return families or None


def _closest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return close[0] if close else None


def _check_model(cfg: ModelConfig) -> dict[str, Any]:
    """Check name, fields, options and fork against the family's builder; the options with typed values."""
    families = model_families()
    if families is None:
        return dict(cfg.options)
    family = next((f for f in families.values() if cfg.name in f.presets), None)
    if family is None:
        known = sorted(n for f in families.values() for n in f.presets)
        close = difflib.get_close_matches(cfg.name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise _FieldError("name", f"unknown model {cfg.name!r}{hint} Known models: {', '.join(known)}")
    builder = f"video_ens/models/{family.module}.py build()"
    for key in MODEL_FIELDS:
        if getattr(cfg, key) is not None and key not in family.keywords:
            raise _FieldError(key, f"model {cfg.name} has no {key} (not a keyword of {builder}): remove it")
    option_names = [k for k in family.keywords if k not in MODEL_FIELDS]
    options = {}
    for key, value in cfg.options.items():
        sub = f"options.{key}"
        if key in MODEL_FIELDS:
            raise _FieldError(sub, f"is a model field: set model.{key} instead of model.options.{key}")
        if key not in family.keywords:
            close = _closest(key, list(family.keywords))
            hint = "."
            if close is not None:
                hint = f"; did you mean {cfg.field_path(close)!r}?"
            raise _FieldError(
                sub, f"unknown option of model {cfg.name} ({builder}){hint} Valid options: {', '.join(option_names)}"
            )
        tp = family.keywords[key]
        if tp is None:
            options[key] = value
            continue
        try:
            options[key] = _convert(value, tp, sub)
        except RecipeError as e:
            where, _, reason = str(e).partition(": ")
            raise _FieldError(where, reason) from None
    if cfg.fork is not None and family.forks is not None and cfg.fork not in family.forks:
        close = _closest(cfg.fork, family.forks)
        hint = f"; did you mean {close!r}?" if close else "."
        raise _FieldError(
            "fork", f"{cfg.fork!r} is not a layer of model {cfg.name}{hint} Valid forks: {', '.join(family.forks)}"
        )
    return options


# --------------------------------------------------------------------------------------------------- sections

IMAGE_EVAL_CROP_FRACTION = 0.875
"""Image evaluation's default: a centre crop of crop_size out of a short side of crop_size / 0.875 (224 of 256)."""



@dataclass
class ModelConfig:
    """Which network to build; `None` keeps the value of the named preset (see video_ens.models.MODELS)."""

    name: str = ""
    """Preset name, e.g. "s3dg_ens2", "dbof", "resnet152_ens2", "s3dg_tiny". Required."""
    num_branches: int | None = None
    """N, the number of branches above the fork; 1 is the single (baseline) network."""
    width_ratio: float | None = None
    """Branch width / baseline width for every layer above the fork. None keeps the preset's; a preset without one
    (and every builder's default) means 1.0 for one branch and 1/1.5 for more (the paper's ~1.5x shrink, S3D-G's
    554). An explicit width_ratio, or num_branches=1, replaces a preset's pinned branch widths
    (video_ens.models.model_kwargs)."""
    fork: str | None = None
    """Layer after which the branches start: an S3D-G layer name (e.g. "MaxPool_4a"), "pool" (DBoF), "stem" or
    "blockK" (ResNet, e.g. "block2")."""
    num_classes: int | None = None
    """Classifier width: 400 for Kinetics-400, 3862 for YouTube-8M 2018, 1000 for ImageNet."""
    dropout: float | None = None
    """Dropout probability before each classifier."""
    conv_init: Literal["default", "normal"] | None = None
    """"normal" draws every conv weight from N(0, conv_init_std^2) (the paper's ResNet setting); "default" is PyTorch's."""
    conv_init_std: float | None = None
    """Standard deviation for conv_init="normal" (paper: 0.03)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Family-specific builder keywords (e.g. {"hidden_size": 3000} for DBoF, {"kernels": "auto"}): each key must be
    a keyword of the family's `build` that is not a model field above, and its value of the annotated type."""
    channels_last: bool = False
    """Use channels-last memory format (channels_last_3d for clips): faster convolutions on recent GPUs."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    init_from: str | None = None
    """Start from saved weights instead of random ones: a safetensors file (a run's model.safetensors, or one that
    tools/import_weights.py wrote from torchvision/timm weights), a run folder (its model.safetensors, else its
    newest checkpoint) or a checkpoint folder (RUN/checkpoints/step_NNNNNNNNN). Tensors match by their name within
    the network, so a baseline initialises a multi-headed model: the base from its lower layers, every branch from
    its upper layers (video_ens/weights.py has the rule). Strict: a tensor neither loaded nor excluded, or of another
    shape, stops the run listing them. A resume from the run's own checkpoint never applies it; and since the
    starting weights define a run, this field is not in RESUME_MAY_CHANGE: other weights are another run, in a run
    folder of its own."""
    init_exclude: list[str] = field(default_factory=list)
    """Glob patterns (fnmatch; '*' also crosses dots) over the model's tensor names that keep their fresh
    initialisation under init_from, e.g. the classifier to fine-tune on other classes: "branches.*.fc.*" (ResNet),
    "branches.*.Logits.conv.*" (S3D-G), "branches.*.moe.*" (DBoF); "branches.*" takes only the base. A pattern
    matching no tensor is an error."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "is required: name a model preset, e.g. \"s3dg_ens2\" or \"s3dg_tiny\"")
        _check(self.init_from is None or bool(self.init_from.strip()), "init_from",
               "is empty: give a weights file, a run folder or a checkpoint folder, or null")
        _check(not self.init_exclude or self.init_from is not None, "init_exclude", "needs model.init_from")
        for i, pattern in enumerate(self.init_exclude):
            _check(bool(pattern), f"init_exclude[{i}]", "is empty: give a glob pattern such as \"branches.*.fc.*\"")
        _check(self.num_branches is None or self.num_branches >= 1, "num_branches", "must be >= 1")
        _check(self.width_ratio is None or 0 < self.width_ratio <= 4, "width_ratio", "must be in (0, 4]")
        _check(self.num_classes is None or self.num_classes >= 2, "num_classes", "must be >= 2")
        _check(self.dropout is None or 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _check(self.conv_init_std is None or self.conv_init_std > 0, "conv_init_std", "must be > 0")
        self.options = _check_model(self)

    def builder_kwargs(self) -> dict[str, Any]:
        """The keywords to pass to `create_model(name, **kwargs)`: set fields plus options."""
        kw = {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}
        return {**kw, **self.options}

    def field_path(self, keyword: str) -> str:
        """The JSON path that sets builder keyword `keyword`: "model.fork", or "model.options.kernels"."""
        return f"model.{keyword}" if keyword in MODEL_FIELDS else f"model.options.{keyword}"


def _is_remote(source: str) -> bool:
    """A shard source read through a command or a URL (video_ens.data.remote reads it)."""
    return source.startswith("pipe:") or source.lower().startswith(("http://", "https://"))


@dataclass
class DataConfig:
    """Where samples come from and how they are turned into batches."""

    kind: Literal["clip", "features", "image"] = "clip"
    """clip: Kinetics-style video shards; features: YouTube-8M frame features; image: ImageNet-style images."""
    train_shards: str = ""
    """Training shard set: a dataset folder with _info.json; a brace pattern of local shards like
    "data/k400/train-{000000..000999}.tar" (then samples_per_epoch is required); or remote, streamed without a local
    copy: a `pipe:` command writing a shard to its output ("pipe:aws s3 cp s3://bucket/k400/train-{000000..000999}.tar
    -", "pipe:gcloud storage cat gs://...") or an http(s) URL, a brace pattern or one shard, whose dataset
    _info.json is read the same way from the shards' folder (without it, set samples_per_epoch); an http(s) URL
    ending in "/" is a dataset folder."""
    val_shards: str = ""
    """Evaluation set: a dataset folder with _info.json, or a remote source as for train_shards. Evaluation splits the
    samples across ranks by _info.json's per-shard counts, so a remote set needs its _info.json beside the shards."""
    demo: Literal["kinetics", "yt8m", "images"] | None = None
    """launch.sh generates this demo dataset (tools/make_demo_data.py --kind ...) under data/demo when missing."""
    samples_per_epoch: int | None = None
    """Nominal epoch length, set on the loader (resampled shards); None = the dataset's sample count."""
    num_workers: int = 4
    """DataLoader worker processes per rank."""
    decoder: Literal["pyav", "decord", "torchcodec"] = "pyav"
    """Video decoder backend (pyav was the fastest on our machines, see design/environment.md)."""
    frames: int = 64
    """Clip length T for training (clips), or sampled frames per video (features; the paper uses 25)."""
    frame_stride: int = 1
    """Temporal stride between sampled clip frames."""
    crop_size: int = 224
    """Spatial crop (clips and images)."""
    short_side: tuple[int, int] = (256, 320)
    """Training short-side scale jitter range [min, max] before the random crop (clips, clip_crop="scale_jitter").
    With clip_crop="resized_crop" clips are decoded at short side max; the low end is also evaluation's default
    scale (eval.short_side)."""
    clip_crop: Literal["scale_jitter", "resized_crop"] = "scale_jitter"
    """Training crop of clips: "scale_jitter" scales the short side to a random size in short_side and takes a
    random crop_size square (PySlowFast's Kinetics recipe, the paper's via Feichtenhofer et al. 2018);
    "resized_crop" takes an Inception-style box (crop_scale, crop_ratio) of the clip decoded at short side
    short_side[1] and resizes it to crop_size x crop_size. Images always use the resized crop."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Resized crop (images; clips with clip_crop="resized_crop"): box area as a fraction of the picture, [min, max]."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Resized crop: box aspect ratio width / height, [min, max], drawn log-uniformly."""
    flip: bool = True
    """Random horizontal flip in training."""
    color_jitter: float = 0.4
    """Brightness/contrast/saturation jitter strength in training (0 disables)."""
    max_skip_fraction: float = 0.5
    """Stop with an error when more than this fraction of samples seen so far were bad (after 100 samples)."""
    repeat_samples: int = 1
    """Clips per decoded video (MAE-ST's repeated sampling, clips only): each video a worker decodes gives this many
    training clips (own crop, scale, flip, colour, and a window shifted within the decoded span) in the same
    micro-batch, which must be a multiple of it. Epochs count clips, so an epoch decodes 1/repeat_samples as many
    videos; the loader's rate in clips/s rises by up to this factor."""
    max_member_bytes: int = 256 << 20
    """Budget of one file inside a shard (a sample's video, image, features or metadata): a larger one is skipped
    unread and counted as bad ("budget"). 256 MiB holds minutes of 1080p H.264; a 10 s Kinetics clip stored at short
    side 256 is ~0.5 MB."""
    max_frame_pixels: int = 4096 * 2304
    """Budget of one decoded frame or image, in pixels (as stored, and after any scaling the decoder is asked for):
    4K (3840 x 2160 and 4096 x 2160) fits. A sample whose header claims more is skipped before anything is
    allocated."""
    max_clip_pixels: int = 1 << 28
    """Budget of the pixels one sample may place in memory at once (frames x box, over all its views): 2^28 pixels are
    768 MiB of RGB. A 10 x 3-view evaluation of 64 x 224 x 224 clips needs 96 M."""
    max_video_frames: int = 1_000_000
    """Budget of the frame count a sample claims (videos and feature sequences): more is skipped as bad. A million
    frames are over nine hours at 30 frames/s."""
    worker_timeout_s: float = 300.0
    """A DataLoader worker that hands over no batch for this long is stuck (a decoder hung on a file: decord is known
    to, dmlc/decord#375): the sample it is decoding is quarantined like one that kills its worker, and the workers
    are replaced. A training micro-batch of 8 64-frame clips takes ~0.4 s per worker; only num_workers >= 1."""
    read_timeout_s: float = 60.0
    """Remote shards and _info.json (`pipe:` commands, http(s) URLs): a read that gets no byte for this long fails
    naming the URL (the shard counts as a bad read, the command is stopped) instead of holding a worker. 60 s is
    botocore's own read timeout; keep it below worker_timeout_s, whose watchdog would otherwise fire first."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "num_workers", "must be >= 0")
        for name in ("max_member_bytes", "max_frame_pixels", "max_clip_pixels", "max_video_frames"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.worker_timeout_s >= 1, "worker_timeout_s", "must be >= 1 second")
        _check(self.read_timeout_s > 0, "read_timeout_s", "must be > 0 seconds")
        remote = [f for f in ("train_shards", "val_shards") if _is_remote(getattr(self, f))]
        _check(
            not remote or self.num_workers == 0 or self.read_timeout_s < self.worker_timeout_s,
            "read_timeout_s",
            f"{self.read_timeout_s:g} s is not below data.worker_timeout_s ({self.worker_timeout_s:g} s) while "
            f"data.{remote[0] if remote else ''} is remote: a stalled read would be quarantined as a hung sample; "
            "lower it or raise worker_timeout_s",
        )
        _check(self.frames >= 1, "frames", "must be >= 1")
        _check(self.frame_stride >= 1, "frame_stride", "must be >= 1")
        _check(self.crop_size >= 8, "crop_size", "must be >= 8")
        lo, hi = self.short_side
        _check(0 < lo <= hi, "short_side", f"must be [min, max] with 0 < min <= max, got [{lo}, {hi}]")
        _check(lo >= self.crop_size, "short_side", f"minimum {lo} is smaller than crop_size {self.crop_size}")
        s_lo, s_hi = self.crop_scale
        _check(0 < s_lo <= s_hi <= 1, "crop_scale", f"must be [min, max] with 0 < min <= max <= 1, got [{s_lo}, {s_hi}]")
        r_lo, r_hi = self.crop_ratio
        _check(0 < r_lo <= r_hi, "crop_ratio", f"must be [min, max] with 0 < min <= max, got [{r_lo}, {r_hi}]")
        _check(0 <= self.color_jitter <= 1, "color_jitter", "must be in [0, 1]")
        _check(0 < self.max_skip_fraction <= 1, "max_skip_fraction", "must be in (0, 1]")
        _check(self.repeat_samples >= 1, "repeat_samples", "must be >= 1")
        _check(
            self.repeat_samples == 1 or self.kind == "clip",
            "repeat_samples",
            f"applies to clips only (data.kind {self.kind!r} decodes each sample for one input): set it to 1",
        )
        _check(self.samples_per_epoch is None or self.samples_per_epoch >= 1, "samples_per_epoch", "must be >= 1")
        _check(bool(self.train_shards), "train_shards", "is required: a converted dataset folder (tools/convert_*.py)")
        _check(bool(self.val_shards), "val_shards", "is required: a converted dataset folder (tools/convert_*.py)")


@dataclass
class ObjectiveConfig:
    """The EnsembleNet loss (video_ens.objective.EnsembleLoss)."""

    structure: Literal["ensembling", "codistillation"] = "codistillation"
    """"codistillation" (paper eq. 3, weight = mu) or "ensembling" (eq. 2, weight = lambda)."""
    weight: float = 2.0
    """mu for co-distillation, lambda for ensembling. Paper best: mu = 3 (ImageNet), 2 (YouTube-8M, Kinetics)."""
    loss: Literal["softmax_ce", "sigmoid_bce", "l2"] = "softmax_ce"
    """l(g, p): softmax_ce (single-label), sigmoid_bce (multi-label, YouTube-8M), l2 (squared error)."""
    label_smoothing: float = 0.0
    """Applied to the ground truth only (paper: 0.1 on ImageNet)."""

    def __post_init__(self) -> None:
        _check(math.isfinite(self.weight), "weight", "must be a finite number")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and regularisation."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    """Torch optimizer passed to the engine: "sgd" (momentum), "adam" or "adamw"."""
    lr: float = 0.1
    """Peak learning rate at `reference_batch_size`; scaled linearly to the global batch when lr_scaling="linear"."""
    lr_scaling: Literal["none", "linear"] = "none"
    """"linear": lr * global_batch_size / reference_batch_size."""
    reference_batch_size: int = 256
    """The global batch size at which `lr` was tuned (used only with lr_scaling="linear")."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW betas."""
    eps: float = 1e-8
    """Adam/AdamW epsilon."""
    weight_decay: float = 0.0
    """L2 weight decay on conv/linear weights (and on BN gamma when decay_bn is true); never on biases."""
    decay_bn: bool = True
    """Also decay BatchNorm gamma (the paper applies L2 to all weights and BN gamma)."""
    schedule: Literal["constant", "step", "exponential", "cosine"] = "cosine"
    """step: x step_gamma every step_epochs; exponential: x exp_gamma every exp_examples samples; cosine: half-cosine to 0."""
    step_epochs: float = 60.0
    """Epochs between step decays (paper ResNet: 60)."""
    step_gamma: float = 0.2
    """Factor per step decay (paper ResNet: 0.2)."""
    exp_examples: int = 1_500_000
    """Examples seen between exponential decays (paper DBoF: 1.5M)."""
    exp_gamma: float = 0.95
    """Factor per exponential decay (paper DBoF: 0.95)."""
    warmup_epochs: float = 0.0
    """Linear warm-up from 0 to the peak learning rate over this many epochs."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        _check(self.reference_batch_size >= 1, "reference_batch_size", "must be >= 1")
        _check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _check(all(0 <= b < 1 for b in self.betas), "betas", "both must be in [0, 1)")
        _check(self.eps > 0, "eps", "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.step_epochs > 0, "step_epochs", "must be > 0")
        _check(0 < self.step_gamma <= 1, "step_gamma", "must be in (0, 1]")
        _check(self.exp_examples >= 1, "exp_examples", "must be >= 1")
        _check(0 < self.exp_gamma <= 1, "exp_gamma", "must be in (0, 1]")
        _check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 (or null to disable)")
        _check(not (self.nesterov and self.name != "sgd"), "nesterov", "applies to name=\"sgd\" only")

    def peak_lr(self, global_batch_size: int) -> float:
        """The peak learning rate of a run with this global batch: lr, scaled when lr_scaling is "linear"."""
        if self.lr_scaling == "linear":
            return self.lr * global_batch_size / self.reference_batch_size
        return self.lr


TRACKERS = ("wandb", "mlflow")
"""The values train.loggers takes (video_ens/trackers.py has an adapter for each)."""


@dataclass
class TrainConfig:
    """How long and how big: the batch is stated once here and DeepSpeed's fields are derived from it."""

    epochs: float = 1.0
    """Training length in epochs of data.samples_per_epoch samples."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, whatever `epochs` says (useful for smoke runs)."""
    global_batch_size: int = 32
    """Samples per optimizer step over all ranks = micro_batch_size x grad_accum_steps x world size."""
    micro_batch_size: int | None = None
    """Samples per rank per forward pass; None derives it from global_batch_size, grad_accum_steps and world size."""
    grad_accum_steps: int | None = None
    """Forward/backward passes per optimizer step; None derives it (1 when micro_batch_size is also unset)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """bf16 and fp16 autocast convs and matmuls while parameters and BatchNorm stay fp32; fp16 adds a dynamic loss
    scale (a GradScaler inside DeepSpeed's optimizer)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: CUDA when available, else CPU."""
    seed: int = 0
    """Seed for initialisation and the data stream (offset by rank and worker), in [0, 2^63)."""
    log_every: int = 10
    """Optimizer steps between metric log lines."""
    eval_every: int = 0
    """Optimizer steps between evaluations (0: only at the end)."""
    checkpoint_every: int = 0
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in the run folder (older ones are deleted)."""
    bn_sync: Literal["sync_bn", "all_reduce", "none"] = "all_reduce"
    """sync_bn: SyncBatchNorm (GPU); all_reduce: average BN running statistics across ranks before eval and save."""
    max_bad_steps: int = 3
    """Stop after this many consecutive non-finite losses (each such step is skipped, not applied)."""
    collective_timeout_s: float = 600.0
    """Longest wait of a rank in a collective (all-reduce, barrier) before the job fails naming this field: a rank
    that stalls (a hung file system, a dead GPU) then ends the job in minutes, not after torch's defaults (30 min on
    gloo). Must cover the slowest legitimate wait: a checkpoint save or an evaluation on another rank."""
    resume: Literal["auto", "force"] = "auto"
    """A run folder holding another run: "auto" resumes its newest checkpoint only when the recipe differs from the
    one that wrote it in nothing but the fields RESUME_MAY_CHANGE lists (length, cadence, workers, evaluation, ...)
    and otherwise stops, naming the fields; "force" resumes anyway (the log and metrics.jsonl name the changes)."""
    loggers: list[str] = field(default_factory=list)
    """Experiment trackers that also get the metrics, besides metrics.jsonl and TensorBoard (always on): "wandb"
    (Weights & Biases; WANDB_MODE=offline, WANDB_PROJECT and the rest of its environment are honoured) and/or
    "mlflow" (MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns; MLFLOW_EXPERIMENT_NAME). Rank 0 logs; the
    resolved recipe is the tracker run's config, and a resumed run continues the same tracker run. Each needs its
    package: pip install 'video_ens[wandb]' / 'video_ens[mlflow]' (checked before launch)."""

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        _check(self.global_batch_size >= 1, "global_batch_size", "must be >= 1")
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        _check(self.grad_accum_steps is None or self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        if self.micro_batch_size is not None:
            _check(
                self.global_batch_size % self.micro_batch_size == 0,
                "micro_batch_size",
                f"{self.micro_batch_size} does not divide global_batch_size {self.global_batch_size}",
            )
        if self.micro_batch_size is not None and self.grad_accum_steps is not None:
            per = self.micro_batch_size * self.grad_accum_steps
            _check(
                self.global_batch_size % per == 0,
                "grad_accum_steps",
                f"micro_batch_size x grad_accum_steps = {per} does not divide global_batch_size "
                f"{self.global_batch_size}; set one of them to null to derive it",
            )
        for name in ("log_every", "eval_every", "checkpoint_every"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(self.log_every >= 1, "log_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
        _check(1 <= self.collective_timeout_s <= 7 * 86400, "collective_timeout_s", "must be in [1, 604800] seconds")
        _check(0 <= self.seed < INT_LIMIT, "seed", "must be in [0, 2^63)")
        for name in self.loggers:
            _check(
                name in TRACKERS,
                "loggers",
                f"{name!r} is always on (metrics.jsonl and TensorBoard): list only extra trackers, {TRACKERS}"
                if name in ("tensorboard", "jsonl", "metrics.jsonl")
                else f"unknown tracker {name!r}; the trackers are {TRACKERS}",
            )
        _check(len(set(self.loggers)) == len(self.loggers), "loggers", f"lists a tracker twice: {self.loggers}")

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(micro_batch_size, grad_accum_steps) for this world size; RecipeError when they cannot agree."""
        gb = self.global_batch_size
        if world_size < 1:
            raise RecipeError(f"world size must be >= 1, got {world_size}")
        if gb % world_size:
            raise RecipeError(
                f"train.global_batch_size {gb} is not divisible by the world size {world_size}: "
                f"choose a multiple of {world_size} or change the number of processes"
            )
        per_rank = gb // world_size
        mb, acc = self.micro_batch_size, self.grad_accum_steps
        if mb is None and acc is None:
            mb, acc = per_rank, 1
        elif mb is None:
            if per_rank % acc:
                raise RecipeError(
                    f"train.grad_accum_steps {acc} does not divide the per-rank batch {per_rank} "
                    f"(global_batch_size {gb} / world size {world_size}): set it to a divisor of {per_rank}, or "
                    "to null and set train.micro_batch_size instead"
                )
            mb = per_rank // acc
        elif acc is None:
            if per_rank % mb:
                raise RecipeError(
                    f"train.micro_batch_size {mb} does not divide the per-rank batch {per_rank} "
                    f"(global_batch_size {gb} / world size {world_size}): set it to a divisor of {per_rank} "
                    f"(e.g. {math.gcd(mb, per_rank)}; gradient accumulation makes up the rest), or to null to use "
                    "the whole per-rank batch"
                )
            acc = per_rank // mb
        if mb * acc * world_size != gb:
            raise RecipeError(
                f"train.micro_batch_size {mb} x train.grad_accum_steps {acc} x world size {world_size} = "
                f"{mb * acc * world_size}, not train.global_batch_size {gb}; set one of them to null to derive it"
            )
        return mb, acc


@dataclass
class DeepSpeedConfig:
    """DeepSpeed engine settings that are not derived from other sections."""

    zero_stage: int = 1
    """ZeRO stage 0-3: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO-Offload; stages 1-3)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduction bucket."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        _check(not (self.offload_optimizer and self.zero_stage == 0), "offload_optimizer", "needs zero_stage >= 1")
        _check(self.reduce_bucket_size >= 1, "reduce_bucket_size", "must be >= 1")


@dataclass
class EvalConfig:
    """Evaluation (periodic during training and tools/eval.py)."""

    mode: Literal["full", "clips"] = "full"
    """clips: K uniform clips x crops per video; full: the whole video in one pass (fully convolutional models)."""
    num_clips: int = 10
    """K for mode="clips"."""
    num_crops: int = 3
    """Spatial crops per clip for mode="clips" (1 = centre, 3 = left/centre/right)."""
    max_frames: int = 300
    """Cap on frames per video for mode="full" (and for YouTube-8M features)."""
    short_side: int | None = None
    """Short side the clips (decoded) or images (resized) are scaled to before the crop. None: for clips
    data.short_side[0], the low end of the training scale; for images round(crop / 0.875) (224 of 256). For the
    paper's Kinetics S3D-G that is 256, the convention the S3D-G and I3D papers evaluate with (short side 256, a
    224 x 224 centre crop, all of up to 250 frames) and PySlowFast's test scale for the training jitter [256, 320]
    the paper follows; scaling the short side to the crop instead (224) would show objects at 0.7-0.875x their
    training size. The demo recipes train with short_side[0] = crop_size, so there nothing changes."""
    crop_size: int | None = None
    """Side of the square evaluation crops (centre, or 3 along the long side); None: data.crop_size. Equal to
    short_side gives PySlowFast's fully convolutional 3 x 256 crops (the models accept any size)."""
    batch_size: int = 8
    """Model inputs per evaluation batch per rank: videos, images, or views (clips x crops) in mode "clips"."""
    top_k: int = 20
    """Predictions kept per video for GAP/mAP (the YouTube-8M convention is 20)."""

    def __post_init__(self) -> None:
        _check(self.num_clips >= 1, "num_clips", "must be >= 1")
        _check(self.num_crops in (1, 3), "num_crops", "must be 1 or 3")
        _check(self.max_frames >= 1, "max_frames", "must be >= 1")
        _check(self.short_side is None or self.short_side >= 8, "short_side", "must be >= 8 (or null for the default)")
        _check(self.crop_size is None or self.crop_size >= 8, "crop_size", "must be >= 8 (or null: data.crop_size)")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.top_k >= 1, "top_k", "must be >= 1")

    def view_size(self, data: DataConfig) -> tuple[int, int]:
        """(short side, crop size) of evaluation views of clips or images, the None defaults resolved."""
        crop = self.crop_size if self.crop_size is not None else data.crop_size
        if self.short_side is not None:
            return self.short_side, crop
        if data.kind == "image":
            return int(crop / IMAGE_EVAL_CROP_FRACTION + 0.5), crop
        return data.short_side[0], crop


@dataclass
class Recipe:
    """One training run. Every section is optional in the JSON except model.name and the data source."""

    description: str = ""
    """What this run is and the result it should reach (cite the paper's table)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network (model.name is required)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data pipeline."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The EnsembleNet loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length, batch and precision."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """`train.batch_layout`, also checking that micro-batches hold whole groups of data.repeat_samples clips."""
        micro, accum = self.train.batch_layout(world_size)
        repeat = self.data.repeat_samples
        if micro % repeat:
            raise RecipeError(
                f"data.repeat_samples: {repeat} clips per decoded video must fill micro-batches of {micro} "
                f"(train.micro_batch_size at world size {world_size}) exactly; set it to a divisor of {micro}, or "
                "set train.micro_batch_size to a multiple of it"
            )
        return micro, accum

    def __post_init__(self) -> None:
        # checked on the value the run uses: lr=1e308 is finite, scaled to a batch of 512 it is not
        o, batch = self.optim, self.train.global_batch_size
        peak = o.peak_lr(batch)
        if not (math.isfinite(peak) and peak > 0):
            raise _FieldError(
                "optim.lr",
                f'with optim.lr_scaling "linear" the peak learning rate {o.lr:g} x {batch} / {o.reference_batch_size} '
                f"is {peak:g}: lower optim.lr or raise optim.reference_batch_size",
            )
        short, crop = self.eval.view_size(self.data)
        if self.data.kind != "features" and short < crop:
            which = "eval.short_side" if self.eval.short_side is not None else "eval.crop_size"
            raise _FieldError(
                which,
                f"the evaluation crop {crop} does not fit in the short side {short}: use eval.short_side >= "
                f"eval.crop_size (null defaults: data.short_side[0] and data.crop_size)",
            )
        multi_label = self.data.kind == "features"
        if multi_label and self.objective.loss == "softmax_ce":
            raise _FieldError(
                "objective.loss",
                "softmax_ce is single-label but data.kind is \"features\" (YouTube-8M, multi-label): use sigmoid_bce",
            )
        if not multi_label and self.objective.loss == "sigmoid_bce":
            raise _FieldError(
                "objective.loss",
                f"sigmoid_bce is multi-label but data.kind is {self.data.kind!r} (single-label): use softmax_ce",
            )


SECTIONS = ("model", "data", "objective", "optim", "train", "deepspeed", "eval")

# --------------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "an object"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


INT_LIMIT = 2**63
"""Recipe integers must lie in [-2^63, 2^63): what torch, NumPy and DeepSpeed take as int64."""


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` (parsed JSON) against the annotation `tp` and return the typed value."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {json.dumps(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {json.dumps(close[0])}?" if close else ""
        raise RecipeError(f"{path}: {json.dumps(value)} is not {_type_name(tp)}{hint}")
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{path}: expected a list of {len(args)} values, got {json.dumps(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{path}: expected a list of {len(args)} values, got {len(value)}: {json.dumps(value)}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{path}: expected a list, got {json.dumps(value)}")
        (a,) = get_args(tp)
        return [_convert(v, a, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected an object, got {json.dumps(value)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT_LIMIT <= value < INT_LIMIT:
                raise RecipeError(f"{path}: {value} is out of range: integers must fit in 64 bits (|value| < 2^63)")
            return value
        if isinstance(value, float) and value.is_integer():
            # 32.0 or 1e308 is a typo or a computed value; int(1e308) has 309 digits and fails only in
            # torch.manual_seed, after the process group has started
            fix = f": write {int(value)}" if abs(value) < INT_LIMIT else ", out of range of a 64-bit integer"
            raise RecipeError(f"{path}: expected an integer, got {json.dumps(value)}{fix}")
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise RecipeError(f"{path}: must be a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only reachable by adding a field of an unsupported type
        raise TypeError(f"{path}: unsupported annotation {tp!r}")
    raise RecipeError(f"{path}: expected {_type_name(tp)}, got {json.dumps(value)} ({type(value).__name__})")


def _build(cls: type, raw: Any, path: str) -> Any:
    where = path or "the recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected an object with keys of {cls.__name__}, got {json.dumps(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else ""
            raise RecipeError(f"unknown key {sub!r}{hint} Valid keys of {where}: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], sub)
    for name in names:  # absent sections are built from {} here so their checks report the right path
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except _FieldError as e:
        full = f"{path}.{e.field_name}" if path else e.field_name
        raise RecipeError(f"{full}: {e}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.1")
    key, text = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise RecipeError(f"--set {item!r}: empty key part in {key!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text  # a bare word such as `structure=ensembling` is a string
    return keys, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted `key=value` overrides to a raw recipe dict (values parsed as JSON, else taken as strings).

    Intermediate objects are created as needed; the result is validated by `recipe_from_dict`, so an override
    that names an unknown key fails the same way a file would.
    """
    out = json.loads(json.dumps(raw))
    for item in overrides:
        keys, value = _parse_override(item)
        node = out
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {item!r}: {k!r} is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return out


def recipe_from_dict(raw: dict, *, source: str = "<dict>") -> Recipe:
    try:
        return _build(Recipe, raw, "")
    except RecipeError as e:
        raise RecipeError(f"{source}: {e}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load and validate a recipe file, applying `--set`-style overrides first."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found (recipes live in recipes/*.json)") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return recipe_from_dict(apply_overrides(raw, list(overrides)), source=source)


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain JSON types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe atomically (temp file + rename); `load_recipe` of it gives an equal Recipe."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(recipe_to_dict(recipe), indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------- run identity
#
# A run folder holds one run; relaunching on it resumes the newest checkpoint. These fields may differ from the
# recipe the checkpoint was written with; any other difference stops the launch (train.resume="force" overrides).
# The same split names default run folders: overrides of other fields make another run, in another folder.

RESUME_MAY_CHANGE = (
    # length and pace: extending or re-pacing a run is what a resume is for
    "description", "train.epochs", "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
    "train.eval_every", "train.log_every", "train.resume",
    # where and how fast it runs: resources, the same global batch and model. The log still names a change, since
    # the data order depends on the number of workers and the batch layout (README, "Training at scale")
    "train.device", "train.micro_batch_size", "train.grad_accum_steps", "data.num_workers", "data.decoder",
    "model.compile", "model.channels_last", "deepspeed.overlap_comm", "deepspeed.reduce_bucket_size",
    # limits, budgets and timeouts that stop a run or skip a sample, changed to get a stopped run going again
    "train.max_bad_steps", "train.collective_timeout_s", "data.max_skip_fraction", "data.max_member_bytes",
    "data.max_frame_pixels", "data.max_clip_pixels", "data.max_video_frames", "data.worker_timeout_s",
    "data.read_timeout_s",
    # where the metrics also go: a dashboard added or dropped changes nothing the run computes
    "train.loggers",
    # evaluation only
    "data.val_shards", "eval",
)  # fmt: skip
"""Recipe fields (dotted; a section name covers all of its fields) a resume may change without train.resume="force"."""


def _may_change(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train.seed": 0, ...} from a recipe dict; model.options is one value (its keys vary by family)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _field_defaults(cls: type = Recipe) -> dict[str, Any]:
    """Every field's default, nested like recipe_to_dict (read from the dataclasses, nothing is validated)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = _field_defaults(hints[f.name])
        else:
            out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return json.loads(json.dumps(out))


def resume_differences(saved: dict, recipe: Recipe) -> list[str]:
    """"path: old -> new" for each field outside RESUME_MAY_CHANGE in which `recipe` differs from `saved`, the
    recipe (as recipe_to_dict gives it) that wrote a run folder's checkpoint or recipe.json. A field the saved
    recipe lacks (written before the field existed) counts as its default; one this code does not know is ignored.
    """
    new = _flat(recipe_to_dict(recipe))
    old = {**_flat(_field_defaults()), **_flat(saved)}
    return [f"{k}: {json.dumps(old.get(k))} -> {json.dumps(v)}" for k, v in sorted(new.items())
            if not _may_change(k) and old.get(k) != v]


def default_run_dir(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """runs/<recipe file name>, with "-<8 hex digits>" added when the overrides change fields outside
    RESUME_MAY_CHANGE: a hash of those fields' values. So `--set train.seed=1` trains a run of its own rather than
    resuming the seed-0 run of the same file, and the same command finds its folder again, while `--set
    train.max_steps=...` still extends the run in runs/<recipe file name>."""
    path = Path(recipe_path)
    plain = Path("runs") / path.stem
    if not overrides:
        return plain
    new = _flat(recipe_to_dict(load_recipe(path, overrides)))
    try:
        base = _flat(recipe_to_dict(load_recipe(path)))
        changed = {k: v for k, v in new.items() if not _may_change(k) and base.get(k) != v}
    except RecipeError:  # the file is complete only with its overrides: hash the fields they set
        keys = [".".join(_parse_override(item)[0]) for item in overrides]

        def overridden(k: str) -> bool:
            return any(k == o or k.startswith(o + ".") or o.startswith(k + ".") for o in keys)

        changed = {k: v for k, v in new.items() if not _may_change(k) and overridden(k)}
    if not changed:
        return plain
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / f"{path.stem}-{digest}"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m video_ens.config", description="Validate and resolve a recipe.")
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--dump", help="write the resolved recipe here")
    ap.add_argument("--quiet", action="store_true", help="print nothing on success")
    ap.add_argument("--get", metavar="KEY", help="print one resolved field (e.g. data.demo; null prints nothing)")
    ap.add_argument("--world-size", type=int, default=None, help="also check the batch fields for this many ranks")
    ap.add_argument("--default-run-dir", action="store_true",
                    help="print the run folder video_ens.train uses without --run-dir (see default_run_dir)")
    args = ap.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.world_size is not None:
            recipe.batch_layout(args.world_size)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dump:
        dump_recipe(recipe, args.dump)
    if args.default_run_dir:
        print(default_run_dir(args.recipe, args.overrides))
    elif args.get:
        node: Any = recipe_to_dict(recipe)
        for part in args.get.split("."):
            if not isinstance(node, dict) or part not in node:
                print(f"error: {args.get!r} is not a field of the recipe", file=sys.stderr)
                return 2
            node = node[part]
        if node is not None:
            print(node if isinstance(node, str) else json.dumps(node))
    elif not args.quiet:
        print(json.dumps(recipe_to_dict(recipe), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

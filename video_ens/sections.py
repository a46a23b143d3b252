"""The recipe's sections, one dataclass each, with a docstring per field and checks naming the field and the fix.

Each component receives only its own section: model, data, objective, optim, train, deepspeed, eval. The Recipe
that holds them, loading and the resolved dump are in video_ens.config; the converter from JSON is
video_ens.typed_json; the model section's `options` are the family dataclasses of video_ens.model_options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .model_options import MODEL_FIELDS, option_names, options_class, split_kwargs
from .typed_json import INT_LIMIT, FieldError, RecipeError, check, closest, from_json


def _check_options(cfg: ModelConfig) -> dict[str, Any]:
    """The model's name, options and fork checked against its family (video_ens.model_options); the options the
    recipe gives, typed by the family's dataclass. What only building can tell (a ResNet branch_widths of the wrong
    length, width_ratio with a pinned branch width) is checked by video_ens.train, which builds the model on the
    meta device before anything else."""
    try:
        cls = options_class(cfg.name)
    except ValueError as e:
        raise FieldError("name", str(e)) from None
    names = option_names(cls)

    def unknown(key: str) -> str:
        if key in MODEL_FIELDS:
            return f"is a model field: set model.{key} instead of model.options.{key}"
        close = closest(key, [*MODEL_FIELDS, *names])
        hint = f"; did you mean {cfg.field_path(close)!r}?" if close else "."
        return f"unknown option of model {cfg.name} ({cls.__name__}){hint} Valid options: {', '.join(names)}"

    try:
        typed = from_json(cls, cfg.options, "model.options", unknown_key=unknown)
    except RecipeError as e:  # ModelConfig's own checks prefix "model.": strip it here
        where, _, reason = str(e).partition(": ")
        raise FieldError(where.removeprefix("model."), reason) from None
    options = {k: getattr(typed, k) for k in cfg.options}
    try:  # again with the preset's values under the recipe's, as the builder gets them
        _, merged = split_kwargs(cfg.name, **cfg.builder_kwargs(options))
    except FieldError as e:
        raise FieldError(f"options.{e.field_name}", str(e)) from None
    forks = merged.forks()
    if cfg.fork is not None and cfg.fork not in forks:
        close = closest(cfg.fork, forks)
        hint = f"; did you mean {close!r}?" if close else "."
        raise FieldError(
            "fork", f"{cfg.fork!r} is not a layer of model {cfg.name}{hint} Valid forks: {', '.join(forks)}"
        )
    return options


IMAGE_EVAL_CROP_FRACTION = 0.875
"""Image evaluation's default: a centre crop of crop_size out of a short side of crop_size / 0.875 (224 of 256)."""


@dataclass
class ModelConfig:
    """Which network to build; `None` keeps the value of the named preset (see video_ens.model_options.PRESETS)."""

    name: str = ""
    """Preset name, e.g. "s3dg_ens2", "dbof", "resnet152_ens2", "s3dg_tiny". Required."""
    num_branches: int | None = None
    """N, the number of branches above the fork; 1 is the single (baseline) network."""
    width_ratio: float | None = None
    """Branch width / baseline width for every layer above the fork. None keeps the preset's; a preset without one
    (and every builder's default) means 1.0 for one branch and 1/1.5 for more (the paper's ~1.5x shrink, S3D-G's
    554). An explicit width_ratio, or num_branches=1, replaces a preset's pinned branch widths
    (video_ens.model_options.model_kwargs)."""
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
    """The family's own options, fields of its dataclass in video_ens/model_options.py (S3DGOptions, DBoFOptions,
    ResNetOptions), e.g. {"hidden_size": 3000} for DBoF or {"kernels": "auto"}; unset ones keep the preset's value,
    then the dataclass default. Checked and typed by that dataclass here, before torch is imported."""
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
        check(bool(self.name), "name", 'is required: name a model preset, e.g. "s3dg_ens2" or "s3dg_tiny"')
        check(
            self.init_from is None or bool(self.init_from.strip()),
            "init_from",
            "is empty: give a weights file, a run folder or a checkpoint folder, or null",
        )
        check(not self.init_exclude or self.init_from is not None, "init_exclude", "needs model.init_from")
        for i, pattern in enumerate(self.init_exclude):
            check(bool(pattern), f"init_exclude[{i}]", 'is empty: give a glob pattern such as "branches.*.fc.*"')
        check(self.num_branches is None or self.num_branches >= 1, "num_branches", "must be >= 1")
        check(self.width_ratio is None or 0 < self.width_ratio <= 4, "width_ratio", "must be in (0, 4]")
        check(self.num_classes is None or self.num_classes >= 2, "num_classes", "must be >= 2")
        check(self.dropout is None or 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(self.conv_init_std is None or self.conv_init_std > 0, "conv_init_std", "must be > 0")
        self.options = _check_options(self)

    def builder_kwargs(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The keywords to pass to `create_model(name, **kwargs)`: the set fields plus the options (`options`
        instead of self.options when given)."""
        kw = {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}
        return {**kw, **(self.options if options is None else options)}

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
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        for name in ("max_member_bytes", "max_frame_pixels", "max_clip_pixels", "max_video_frames"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.worker_timeout_s >= 1, "worker_timeout_s", "must be >= 1 second")
        check(self.read_timeout_s > 0, "read_timeout_s", "must be > 0 seconds")
        remote = [f for f in ("train_shards", "val_shards") if _is_remote(getattr(self, f))]
        check(
            not remote or self.num_workers == 0 or self.read_timeout_s < self.worker_timeout_s,
            "read_timeout_s",
            f"{self.read_timeout_s:g} s is not below data.worker_timeout_s ({self.worker_timeout_s:g} s) while "
            f"data.{remote[0] if remote else ''} is remote: a stalled read would be quarantined as a hung sample; "
            "lower it or raise worker_timeout_s",
        )
        check(self.frames >= 1, "frames", "must be >= 1")
        check(self.frame_stride >= 1, "frame_stride", "must be >= 1")
        check(self.crop_size >= 8, "crop_size", "must be >= 8")
        lo, hi = self.short_side
        check(0 < lo <= hi, "short_side", f"must be [min, max] with 0 < min <= max, got [{lo}, {hi}]")
        check(lo >= self.crop_size, "short_side", f"minimum {lo} is smaller than crop_size {self.crop_size}")
        s_lo, s_hi = self.crop_scale
        check(0 < s_lo <= s_hi <= 1, "crop_scale", f"must be [min, max] with 0 < min <= max <= 1, got [{s_lo}, {s_hi}]")
        r_lo, r_hi = self.crop_ratio
        check(0 < r_lo <= r_hi, "crop_ratio", f"must be [min, max] with 0 < min <= max, got [{r_lo}, {r_hi}]")
        check(0 <= self.color_jitter <= 1, "color_jitter", "must be in [0, 1]")
        check(0 < self.max_skip_fraction <= 1, "max_skip_fraction", "must be in (0, 1]")
        check(self.repeat_samples >= 1, "repeat_samples", "must be >= 1")
        check(
            self.repeat_samples == 1 or self.kind == "clip",
            "repeat_samples",
            f"applies to clips only (data.kind {self.kind!r} decodes each sample for one input): set it to 1",
        )
        check(self.samples_per_epoch is None or self.samples_per_epoch >= 1, "samples_per_epoch", "must be >= 1")
        check(bool(self.train_shards), "train_shards", "is required: a converted dataset folder (tools/convert_*.py)")
        check(bool(self.val_shards), "val_shards", "is required: a converted dataset folder (tools/convert_*.py)")


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
        check(math.isfinite(self.weight), "weight", "must be a finite number")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")


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
        check(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        check(self.reference_batch_size >= 1, "reference_batch_size", "must be >= 1")
        check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        check(all(0 <= b < 1 for b in self.betas), "betas", "both must be in [0, 1)")
        check(self.eps > 0, "eps", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.step_epochs > 0, "step_epochs", "must be > 0")
        check(0 < self.step_gamma <= 1, "step_gamma", "must be in (0, 1]")
        check(self.exp_examples >= 1, "exp_examples", "must be >= 1")
        check(0 < self.exp_gamma <= 1, "exp_gamma", "must be in (0, 1]")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 (or null to disable)")
        check(not (self.nesterov and self.name != "sgd"), "nesterov", 'applies to name="sgd" only')

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
        check(self.epochs > 0, "epochs", "must be > 0")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        check(self.global_batch_size >= 1, "global_batch_size", "must be >= 1")
        check(self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        check(self.grad_accum_steps is None or self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        if self.micro_batch_size is not None:
            check(
                self.global_batch_size % self.micro_batch_size == 0,
                "micro_batch_size",
                f"{self.micro_batch_size} does not divide global_batch_size {self.global_batch_size}",
            )
        if self.micro_batch_size is not None and self.grad_accum_steps is not None:
            per = self.micro_batch_size * self.grad_accum_steps
            check(
                self.global_batch_size % per == 0,
                "grad_accum_steps",
                f"micro_batch_size x grad_accum_steps = {per} does not divide global_batch_size "
                f"{self.global_batch_size}; set one of them to null to derive it",
            )
        for name in ("log_every", "eval_every", "checkpoint_every"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.log_every >= 1, "log_every", "must be >= 1")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        check(self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
        check(1 <= self.collective_timeout_s <= 7 * 86400, "collective_timeout_s", "must be in [1, 604800] seconds")
        check(0 <= self.seed < INT_LIMIT, "seed", "must be in [0, 2^63)")
        for name in self.loggers:
            check(
                name in TRACKERS,
                "loggers",
                f"{name!r} is always on (metrics.jsonl and TensorBoard): list only extra trackers, {TRACKERS}"
                if name in ("tensorboard", "jsonl", "metrics.jsonl")
                else f"unknown tracker {name!r}; the trackers are {TRACKERS}",
            )
        check(len(set(self.loggers)) == len(self.loggers), "loggers", f"lists a tracker twice: {self.loggers}")

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
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        check(not (self.offload_optimizer and self.zero_stage == 0), "offload_optimizer", "needs zero_stage >= 1")
        check(self.reduce_bucket_size >= 1, "reduce_bucket_size", "must be >= 1")


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
        check(self.num_clips >= 1, "num_clips", "must be >= 1")
        check(self.num_crops in (1, 3), "num_crops", "must be 1 or 3")
        check(self.max_frames >= 1, "max_frames", "must be >= 1")
        check(self.short_side is None or self.short_side >= 8, "short_side", "must be >= 8 (or null for the default)")
        check(self.crop_size is None or self.crop_size >= 8, "crop_size", "must be >= 8 (or null: data.crop_size)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.top_k >= 1, "top_k", "must be >= 1")

    def view_name(self, data: DataConfig) -> str:
        """How evaluation sees a sample, as evaluation folders and embeddings indexes name it: "full" or
        "clips<K>x<crops>" for clips, "center_crop" for images, "all_frames" for features."""
        if data.kind == "clip":
            return "full" if self.mode == "full" else f"clips{self.num_clips}x{self.num_crops}"
        return "center_crop" if data.kind == "image" else "all_frames"

    def view_size(self, data: DataConfig) -> tuple[int, int]:
        """(short side, crop size) of evaluation views of clips or images, the None defaults resolved."""
        crop = self.crop_size if self.crop_size is not None else data.crop_size
        if self.short_side is not None:
            return self.short_side, crop
        if data.kind == "image":
            return int(crop / IMAGE_EVAL_CROP_FRACTION + 0.5), crop
        return data.short_side[0], crop

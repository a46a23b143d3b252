"""Recipes: one JSON file per run, loaded strictly into typed sections.

A recipe has a `description` and seven sections, each a dataclass in video_ens.sections with a docstring per field
and its default in code: model, data, objective, optim, train, deepspeed, eval. Loading is strict
(video_ens.typed_json): an unknown key, a value of the wrong type or an impossible value raises `RecipeError`
naming the JSON path (`optim.lr`), the reason and, for unknown keys, the closest valid key. Command-line overrides
(`--set optim.lr=0.1`) are applied to the raw JSON before validation, so they go through the same checks.
`dump_recipe` writes the resolved recipe (defaults filled, overrides applied); loading that file gives an equal
Recipe. The run-identity rules below decide which changes a resume may make and name default run folders.

    python -m video_ens.config recipes/demo_kinetics_s3dg_mu2.json --set optim.lr=0.1 [--dump resolved.json]

validates a recipe and prints it resolved, without importing torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import durable
from .model_options import MODEL_FIELDS
from .sections import (
    TRACKERS,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
)
from .typed_json import FieldError, RecipeError, from_json

__all__ = [
    "MODEL_FIELDS", "RESUME_MAY_CHANGE", "RESUME_UNREPORTED", "SECTIONS", "TRACKERS",
    "DataConfig", "DeepSpeedConfig", "EvalConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig", "Recipe",
    "RecipeError", "TrainConfig", "apply_overrides", "default_run_dir", "dump_recipe", "load_recipe", "main",
    "recipe_from_dict", "recipe_to_dict", "resume_differences",
]  # fmt: skip


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
            raise FieldError(
                "optim.lr",
                f'with optim.lr_scaling "linear" the peak learning rate {o.lr:g} x {batch} / {o.reference_batch_size} '
                f"is {peak:g}: lower optim.lr or raise optim.reference_batch_size",
            )
        short, crop = self.eval.view_size(self.data)
        if self.data.kind != "features" and short < crop:
            which = "eval.short_side" if self.eval.short_side is not None else "eval.crop_size"
            raise FieldError(
                which,
                f"the evaluation crop {crop} does not fit in the short side {short}: use eval.short_side >= "
                f"eval.crop_size (null defaults: data.short_side[0] and data.crop_size)",
            )
        multi_label = self.data.kind == "features"
        if multi_label and self.objective.loss == "softmax_ce":
            raise FieldError(
                "objective.loss",
                'softmax_ce is single-label but data.kind is "features" (YouTube-8M, multi-label): use sigmoid_bce',
            )
        if not multi_label and self.objective.loss == "sigmoid_bce":
            raise FieldError(
                "objective.loss",
                f"sigmoid_bce is multi-label but data.kind is {self.data.kind!r} (single-label): use softmax_ce",
            )


SECTIONS = ("model", "data", "objective", "optim", "train", "deepspeed", "eval")

# --------------------------------------------------------------------------------------------------- loading


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
        return from_json(Recipe, raw, "")
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
    """Write the resolved recipe atomically and durably (`durable.write_atomic`: a resume compares against it, so a
    crash leaves the old one or the new one whole); `load_recipe` of it gives an equal Recipe."""
    durable.write_atomic(path, json.dumps(recipe_to_dict(recipe), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------- run identity
#
# A run folder holds one run; relaunching on it resumes the newest checkpoint. These fields may differ from the
# recipe the checkpoint was written with; any other difference stops the launch (train.resume="force" overrides).
# The same split names default run folders: overrides of other fields make another run, in another folder.

RESUME_UNREPORTED = (
    # length and pace: extending or re-pacing a run is what a resume is for
    "description", "train.epochs", "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
    "train.eval_every", "train.log_every", "train.resume",
    # timeouts, changed to get a stopped run going again
    "train.collective_timeout_s", "data.worker_timeout_s", "data.read_timeout_s",
    # where the metrics also go: a dashboard added or dropped
    "train.loggers",
)  # fmt: skip
"""Fields (dotted, whole) a resume may change that change nothing the run computes: the trainer's resume line leaves
them out of its list of changes."""

RESUME_MAY_CHANGE = (
    *RESUME_UNREPORTED,
    # where and how fast it runs: resources, the same global batch and model. The log still names a change, since
    # the data order depends on the number of workers and the batch layout (README, "Training at scale")
    "train.device", "train.micro_batch_size", "train.grad_accum_steps", "data.num_workers", "data.decoder",
    "model.compile", "model.channels_last", "deepspeed.overlap_comm", "deepspeed.reduce_bucket_size",
    # limits and budgets that stop a run or skip a sample, changed to get a stopped run going again
    "train.max_bad_steps", "data.max_skip_fraction", "data.max_member_bytes", "data.max_frame_pixels",
    "data.max_clip_pixels", "data.max_video_frames",
    # evaluation only
    "data.val_shards", "eval",
)  # fmt: skip
"""Recipe fields (dotted; a section name covers all of its fields) a resume may change without train.resume="force"."""


def _may_change(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE)


def flatten_recipe(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train.seed": 0, ...} from a recipe dict; model.options is one value (its keys vary by family)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(flatten_recipe(v, f"{prefix}{k}."))
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
    """ "path: old -> new" for each field outside RESUME_MAY_CHANGE in which `recipe` differs from `saved`, the
    recipe (as recipe_to_dict gives it) that wrote a run folder's checkpoint or recipe.json. A field the saved
    recipe lacks (written before the field existed) counts as its default; one this code does not know is ignored.
    """
    new = flatten_recipe(recipe_to_dict(recipe))
    old = {**flatten_recipe(_field_defaults()), **flatten_recipe(saved)}
    return [
        f"{k}: {json.dumps(old.get(k))} -> {json.dumps(v)}"
        for k, v in sorted(new.items())
        if not _may_change(k) and old.get(k) != v
    ]


def default_run_dir(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """runs/<recipe file name>, with "-<8 hex digits>" added when the overrides change fields outside
    RESUME_MAY_CHANGE: a hash of those fields' values. So `--set train.seed=1` trains a run of its own rather than
    resuming the seed-0 run of the same file, and the same command finds its folder again, while `--set
    train.max_steps=...` still extends the run in runs/<recipe file name>."""
    path = Path(recipe_path)
    plain = Path("runs") / path.stem
    if not overrides:
        return plain
    new = flatten_recipe(recipe_to_dict(load_recipe(path, overrides)))
    try:
        base = flatten_recipe(recipe_to_dict(load_recipe(path)))
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
    ap.add_argument(
        "--default-run-dir",
        action="store_true",
        help="print the run folder video_ens.train uses without --run-dir (see default_run_dir)",
    )
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

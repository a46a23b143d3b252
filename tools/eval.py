#!/usr/bin/env python
"""Evaluate trained weights on the recipe's evaluation set: every metric per branch and for the ensemble.

    python tools/eval.py --run-dir runs/demo1                            # -> runs/demo1/eval/full/
    python tools/eval.py --run-dir runs/demo1 --set eval.mode=clips      # -> runs/demo1/eval/clips10x3-<hash>/
    python tools/eval.py --recipe recipes/kinetics_s3dg_mu2.json --weights model.safetensors --out results/
    torchrun --nproc-per-node 8 tools/eval.py --run-dir runs/kinetics_s3dg_mu2 --precision bf16

Weights are a safetensors state dict (RUN_DIR/model.safetensors, as training writes it), loaded strictly into the
model the recipe builds; no DeepSpeed. Under torchrun every rank evaluates its share of data.val_shards (gloo on
CPU, nccl on GPU) and the metrics merge by sample id, so every video counts exactly once whatever the number of
ranks. What is evaluated, per data.kind:

* clip (Kinetics): eval.mode "full" passes each whole video (its first eval.max_frames frames, short side scaled
  to data.crop_size, centre crop) through the fully convolutional S3D-G at once; videos longer than
  --max-chunk-frames are computed in temporal windows with the same result (video_ens.evaluate.full_clip_forward).
  eval.mode "clips": eval.num_clips clips x eval.num_crops crops per video (10 x 3 by default), probabilities
  averaged per video across ranks. Top-1 and top-5.
* features (YouTube-8M): every frame of every video (up to eval.max_frames); GAP@eval.top_k, mAP, hit@1.
* image (ImageNet): short side scaled to crop_size / 0.875, centre crop; top-1 and top-5.

Writes OUT/eval.json (training's schema plus mode, throughput and the setup: {"ensemble": {...}, "branches": [...],
"num_samples": n, "mode": ..., "throughput": {...}, "bad_samples": n, "bad_sample_keys": {...}, ..., "recipe":
{...}}, then the per-class report: "class_names" (the evaluation set's _info.json label_names, or null), "per_class"
(one row per class: support, top-1/top-5, precision and each branch's top-1; multi-label: positives, AP and each
branch's AP), for single-label data "confused_pairs" (the most frequent true -> predicted mistakes) and
"confusion_png"), OUT/eval.md (the same as tables, worst class first; the metric table is also printed),
OUT/confusion.png (single-label data, the ensemble's confusion matrix; needs matplotlib, else a warning), with
--save-scores OUT/scores.npz (per-video probabilities of every head, averaged over views), and with --kaggle the
ensemble's predictions as a YouTube-8M Kaggle submission (features data): "VideoId,LabelConfidencePairs", then
per video its 20 best "label confidence" pairs, best first (video_ens.report.kaggle_submission). Every file is
written whole or not at all (video_ens.durable). OUT defaults to RUN_DIR/eval/<mode>[-<hash>] (RUN_DIR: --run-dir,
or the folder of --weights): the mode ("full", "clips10x3", "all_frames", "center_crop"), and with --set or
--precision a hash of them, so evaluations with other settings land beside each other. Training's own
RUN_DIR/eval.json is never overwritten: an --out that is a training run folder (one with recipe.json or
checkpoints/) is refused.

Samples that cannot be evaluated (undecodable, a label outside the label map, a damaged shard) are skipped; the
metrics cover the rest. Their count is "bad_samples"; "bad_sample_keys" names them as the training log's eval
lines do: {"bad": n, "bad_by_reason": {reason: n}, "last_bad": [{"key", "reason", "detail", "rank"}]} (each rank's
last few, video_ens.data.samples.LAST_BAD_KEPT). The log and eval.md list them too.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from video_ens import cli, dist, durable
from video_ens.config import RecipeError, load_recipe, recipe_to_dict
from video_ens.data import loader
from video_ens.evaluate import evaluate, load_weights
from video_ens.models import channels_last, create_model
from video_ens.report import (
    KAGGLE_TOP_K,
    bad_sample_lines,
    bad_sample_summary,
    class_report,
    report_markdown,
    write_kaggle_submission,
)

LOG = dist.get_logger("video_ens.tools.eval")

MODE_BY_KIND = {"features": "all_frames", "image": "center_crop"}  # clips take eval.mode
THROUGHPUT_KEYS = ("samples_per_s", "inputs_per_s", "seconds", "inputs", "metrics_seconds")
BAD_KEYS_SHOWN = 5  # bad samples named in the log line; eval.md and eval.json list every one kept


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_source(p, "what to evaluate (either --run-dir, or --recipe with --weights)")
    cli.add_overrides(p, "eval.mode=clips, eval.num_clips=10, data.num_workers=0")
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: RUN_DIR/eval/<mode>[-<hash of --set and --precision>]; never a "
        "training run folder)",
    )
    cli.add_precision(p)
    cli.add_device(p)
    p.add_argument(
        "--max-chunk-frames",
        type=int,
        default=0,
        help="eval.mode full: compute videos longer than this many frames in temporal windows of at most "
        "this many frames, with the one-pass result (S3D-G's gates still hold whole-clip activations, "
        "so this lowers peak memory by ~25%%, see video_ens/evaluate.py). 0 = always one pass",
    )
    p.add_argument("--save-scores", action="store_true", help="also write OUT/scores.npz")
    p.add_argument(
        "--kaggle",
        nargs="?",
        const="",
        type=str,
        metavar="CSV",
        help="YouTube-8M (data.kind features): also write the ensemble's predictions as a Kaggle "
        f"submission, the {KAGGLE_TOP_K} best label/confidence pairs per video (fewer if eval.top_k "
        "is smaller), to CSV (default OUT/kaggle_submission.csv)",
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=50,
        help="log progress (inputs done of this rank's share, %%, rate, ETA) every this many batches; 0 = never",
    )
    args = p.parse_args(argv)
    cli.check_model_source(p, args)
    if args.max_chunk_frames < 0:
        p.error("--max-chunk-frames must be >= 0")
    if args.log_every < 0:
        p.error("--log-every must be >= 0")
    return args


def resolve_sources(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(recipe, weights, out) from the arguments; explicit --recipe/--weights/--out win over the run folder.

    The default out is a folder of its own under RUN_DIR/eval (see the module docstring); ValueError for an --out
    that would overwrite a training run's outputs.
    """
    run = args.run_dir
    recipe, weights = cli.model_files(args)
    out = args.out
    if out is None:
        out = (run or weights.parent) / "eval" / _out_name(load_recipe(recipe, args.overrides), args)
    elif _is_training_run(out) or (run is not None and out.resolve() == run.resolve()):
        raise ValueError(
            f"--out {out}: a training run folder, whose eval.json is one of the training outputs, "
            "which evaluation never overwrites: leave --out out (RUN_DIR/eval/...) or name another folder"
        )
    return recipe, weights, out


def _is_training_run(folder: Path) -> bool:
    return (folder / "recipe.json").is_file() or (folder / "checkpoints").is_dir()


def _out_name(recipe, args: argparse.Namespace) -> str:
    """ "full", "clips10x3", "all_frames", "center_crop", with "-<8 hex digits>" of --set and --precision if any."""
    name = recipe.eval.view_name(recipe.data)
    settings = [*args.overrides, *([f"--precision={args.precision}"] if args.precision else [])]
    if settings:
        name += "-" + hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:8]
    return name


def write_npz(path: Path, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    durable.write_atomic(path, buffer.getvalue())


def run(args: argparse.Namespace) -> int:
    recipe_path, weights_path, out_dir = resolve_sources(args)
    recipe = load_recipe(recipe_path, args.overrides)
    if args.kaggle is not None:
        if recipe.data.kind != "features":
            raise ValueError(
                f"--kaggle writes YouTube-8M predictions (data.kind features); this recipe's data.kind "
                f"is {recipe.data.kind!r}"
            )
        if not Path(recipe.data.val_shards).is_dir():
            raise ValueError(
                f"--kaggle reads the video ids from the samples of a local dataset folder; "
                f"data.val_shards is {recipe.data.val_shards!r}"
            )
    device = dist.pick_device(args.device or recipe.train.device)
    dist.init(device)
    precision = args.precision or recipe.train.precision

    model = create_model(recipe.model.name, **recipe.model.builder_kwargs())
    load_weights(model, weights_path, expect_model=recipe.model.name)
    model = model.to(device)
    if recipe.model.channels_last:
        model = channels_last(model)
    loader.check_compatible(recipe.data, recipe.model.name, model.input_spec)
    if not recipe.data.val_shards:
        raise RecipeError("data.val_shards: empty; name the evaluation dataset folder (--set data.val_shards=DIR)")
    # Only the evaluation folder is read: the training shards need not exist where the weights are evaluated.
    paths = loader.DataPaths(train=recipe.data.train_shards, val=recipe.data.val_shards)  # strings: URLs too
    stream = loader.eval_stream(
        recipe.data,
        recipe.eval,
        input_spec=model.input_spec,
        rank=dist.rank(),
        world_size=dist.world_size(),
        root=paths,
    )
    mode = recipe.eval.mode if recipe.data.kind == "clip" else MODE_BY_KIND[recipe.data.kind]
    LOG.info(
        f"evaluating {recipe.model.name} on {paths.val} ({stream.num_samples} samples, mode {mode}) with "
        f"{dist.world_size()} process(es) on {device}, precision {precision}"
    )

    views = recipe.eval.num_clips * recipe.eval.num_crops if mode == "clips" else 1
    task = loader.metrics_task(recipe.data)
    result = evaluate(
        model,
        stream,
        task=task,
        top_k=recipe.eval.top_k,
        device=device,
        precision=precision,
        max_chunk_frames=args.max_chunk_frames,
        keep_scores=args.save_scores,
        log_every=args.log_every,
        views_per_sample=views,
        per_class=True,
        keep_top=args.kaggle is not None,
    )
    if dist.is_main():
        out = {
            "ensemble": result["ensemble"],
            "branches": result["branches"],
            "num_samples": result["num_samples"],
            "mode": mode,
            "views_per_video": views if mode == "clips" else None,
            "throughput": {k: result[k] for k in THROUGHPUT_KEYS},
            "model": recipe.model.name,
            "num_branches": model.num_branches,
            "dataset": str(paths.val),
            "dataset_size": stream.num_samples,
            "bad_samples": result["bad_samples"],  # the count, as before; the keys follow
            "bad_sample_keys": result["bad_sample_keys"],
            "weights": str(weights_path),
            "world_size": dist.world_size(),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "precision": precision,
            "max_chunk_frames": args.max_chunk_frames or None,
            "recipe": recipe_to_dict(recipe),
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        where = "/".join(Path(str(paths.val)).parts[-2:])  # e.g. kinetics/val
        out.update(
            class_report(
                result["per_class"],
                task,
                stream.label_names,
                out_dir,
                title=f"{recipe.model.name}, ensemble: {where} ({result['num_samples']} samples)",
            )
        )
        if args.kaggle is not None:
            kaggle = Path(args.kaggle) if args.kaggle else out_dir / "kaggle_submission.csv"
            videos = write_kaggle_submission(kaggle, result["top"], paths.val)
            out["kaggle_submission"] = str(kaggle)
            LOG.info(f"wrote {kaggle} ({videos} videos)")
        durable.write_atomic(out_dir / "eval.json", json.dumps(out, indent=2) + "\n")
        durable.write_atomic(out_dir / "eval.md", report_markdown(out))
        if "scores" in result:
            write_npz(out_dir / "scores.npz", result["scores"])
        if result["num_samples"] < stream.num_samples or result["bad_samples"]:
            bad = result["bad_sample_keys"]
            named = bad_sample_lines(bad, BAD_KEYS_SHOWN)
            message = (
                f"{stream.num_samples - result['num_samples']} of {stream.num_samples} samples could not be "
                f"evaluated (bad samples: {bad_sample_summary(bad)}); the metrics cover the rest"
            )
            if named:
                more = len(bad["last_bad"]) - len(named)
                message += ". Skipped: " + "; ".join(named) + (f"; {more} more in eval.json" if more > 0 else "")
            LOG.warning(message)
        print(report_markdown(out, with_class_table=False))  # the per-class table is in eval.md
        LOG.info(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rc = run(args)
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        # No barrier: the other ranks may be waiting in a collective this rank will never join; exiting non-zero
        # lets torchrun stop them.
        if dist.is_initialized():
            torch.distributed.destroy_process_group()
        return 2
    dist.shutdown()  # barrier, then destroy the group
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Command-line options that several tools share, defined once so that their names, defaults and help agree.

The tools that run a trained model (tools/eval.py, tools/predict.py) take it from a run folder or from a recipe and
weights, recipe overrides, a device and a precision. The dataset converters (tools/convert_*.py) take workers, a
timeout, a shard size, a shuffle seed and --overwrite, and report the same way: a summary, the time taken, and exit
status 2 for bad input or 1 when a shard could not be written.

Only the standard library is imported (no video_ens module either), so a tool's --help answers before torch loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

# The values of the recipe's train.precision and train.device (video_ens/sections.py, TrainSection), which these
# options override.
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cuda", "cpu")
# The files of a finished run folder (video_ens/train.py writes them) that --run-dir stands for.
RUN_RECIPE = "recipe.json"
RUN_WEIGHTS = "model.safetensors"

MODEL_SOURCE_ERROR = "give --run-dir, or both --recipe and --weights"

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ a trained model


def add_model_source(parser: argparse.ArgumentParser, title: str) -> None:
    """--run-dir, --recipe and --weights in a group headed `title`; check them with check_model_source."""
    group = parser.add_argument_group(title)
    group.add_argument("--run-dir", type=Path, help=f"a finished run folder: reads {RUN_RECIPE} and {RUN_WEIGHTS}")
    group.add_argument("--recipe", type=Path, help=f"a recipe file (instead of RUN_DIR/{RUN_RECIPE})")
    group.add_argument("--weights", type=Path, help=f"a safetensors state dict (instead of RUN_DIR/{RUN_WEIGHTS})")


def check_model_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through parser.error (status 2, with the usage) unless the arguments name a recipe and weights."""
    if args.run_dir is None and (args.recipe is None or args.weights is None):
        parser.error(MODEL_SOURCE_ERROR)


def model_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """(recipe, weights): --recipe and --weights where given, else the files of --run-dir."""
    recipe = args.recipe or args.run_dir / RUN_RECIPE
    weights = args.weights or args.run_dir / RUN_WEIGHTS
    return recipe, weights


def add_overrides(parser: argparse.ArgumentParser, examples: str) -> None:
    """--set KEY=VALUE, repeatable, into args.overrides (a list, empty by default); `examples` end its help."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"recipe override, e.g. {examples}",
    )


def add_precision(parser: argparse.ArgumentParser) -> None:
    """--precision, None unless given (the caller falls back to the recipe's train.precision)."""
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="autocast dtype of the forward (default: the recipe's train.precision)"
    )


def add_device(parser: argparse.ArgumentParser) -> None:
    """--device, None unless given (the caller falls back to the recipe's train.device)."""
    parser.add_argument("--device", choices=DEVICES, help="default: the recipe's train.device")


# ------------------------------------------------------------------------------------------------ dataset converters


def add_converter_options(
    parser: argparse.ArgumentParser,
    *,
    timeout: float,
    timeout_item: str,
    on_hang: str,
    shard_size: int,
    shard_item: str,
    shuffle_order: str | None,
    overwrite_help: str = "replace an existing dataset at --out",
) -> None:
    """--workers, --timeout, --shard-size, then --seed and --no-shuffle (unless shuffle_order is None), --overwrite.

    The defaults and words differ by what is converted, e.g. timeout_item "a clip", on_hang "a hung decoder is
    killed, the clip skipped", shard_item "samples", shuffle_order "the CSV order" (the order --no-shuffle keeps).
    converter_kwargs reads them back as the keywords of the converters' convert().
    """
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help=f"seconds {timeout_item} may take (with --workers > 1): {on_hang}",
    )
    parser.add_argument("--shard-size", type=int, default=shard_size, help=f"{shard_item} per shard")
    if shuffle_order is not None:
        parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the sample order")
        parser.add_argument("--no-shuffle", action="store_true", help=f"keep {shuffle_order}")
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)


def converter_kwargs(args: argparse.Namespace) -> dict:
    """The options of add_converter_options as convert() keywords: workers, timeout, shard_size, overwrite, and
    seed (None with --no-shuffle: keep the input order) where the converter shuffles."""
    kwargs = {
        "workers": args.workers,
        "timeout": args.timeout,
        "shard_size": args.shard_size,
        "overwrite": args.overwrite,
    }
    if hasattr(args, "no_shuffle"):
        kwargs["seed"] = None if args.no_shuffle else args.seed
    return kwargs


def run_converter(name: str, convert: Callable[[], T], summary: Callable[[T], Iterable[str]]) -> int:
    """Run `convert()`, print `summary` of its result and the time taken; the exit status.

    2 for what the user can fix (an existing --out without --overwrite, a missing input, a bad value); 1 for any
    other OSError, e.g. a shard that could not be written (disk full): the converters publish nothing then, and the
    error names the file. Errors go to stderr as "<name>: error: ..." without a traceback.
    """
    start = time.perf_counter()
    try:
        result = convert()
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{name}: error: {e}\n  nothing was published", file=sys.stderr)
        return 1
    for line in summary(result):
        print(line)
    print(f"  took {time.perf_counter() - start:.1f} s")
    return 0

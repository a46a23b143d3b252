"""What the integration tests build to train or evaluate on, and read back: the data section of a tiny recipe, a
run folder as training leaves one (without training), a single-process evaluation stream, and metrics.jsonl.

recipe = {"model": {"name": "dbof_tiny_ens2"}, "data": data_section("features", yt8m), "train": {...}}
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

# The input sizes the tiny models are built for, per data.kind: 16-frame 64-pixel clips (S3D-G), 25 feature frames
# (DBoF), 32-pixel images (ResNet, with model.options.image_size 32).
TINY_INPUT = {
    "clip": {"frames": 16, "crop_size": 64, "short_side": [64, 72]},
    "features": {"frames": 25},
    "image": {"crop_size": 32, "short_side": [32, 36]},
}


def data_section(kind: str, root: Path, **fields) -> dict:
    """A recipe's data section for a tiny model on the demo dataset at `root` (its train/ and val/ shards): the
    input sizes of TINY_INPUT[kind], no loader workers, then `fields`."""
    return {
        "kind": kind,
        "train_shards": str(root / "train"),
        "val_shards": str(root / "val"),
        **copy.deepcopy(TINY_INPUT[kind]),  # a test may change its recipe's lists, never these
        "num_workers": 0,
        **fields,
    }


def cpu_train(**fields) -> dict:
    """A recipe's train section for a tiny run on CPU in fp32, logging every step; `fields` give max_steps (which ends
    the run: epochs 100 is more than any of them reaches) and the batch. A test's own overrides go on top with `|`."""
    return {"epochs": 100, "precision": "fp32", "device": "cpu", "log_every": 1, **fields}


def write_run(run: Path, recipe: dict, model) -> Path:
    """A finished-looking run folder RUN: the resolved recipe.json and `model`'s weights as model.safetensors,
    tagged with the model name, as train.py saves them."""
    from safetensors.torch import save_file

    from video_ens.config import dump_recipe, recipe_from_dict

    run.mkdir(parents=True)
    dump_recipe(recipe_from_dict(recipe), run / "recipe.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(run / "model.safetensors"), metadata={"model": recipe["model"]["name"]})
    return run


def eval_stream(recipe, model, root):
    """The evaluation stream of a loaded `recipe` as a single process reads it, for `model`'s inputs, with the
    shard folders `root` (a loader.DataPaths)."""
    from video_ens.data import loader

    return loader.eval_stream(recipe.data, recipe.eval, input_spec=model.input_spec, rank=0, world_size=1, root=root)


def metrics(run: Path, kind: str | None = None) -> list[dict]:
    """RUN/metrics.jsonl in order (only the records of `kind` if given). Text after the last newline is a line the
    trainer is still writing (it writes whole lines) and is left out, so a test may poll the file."""
    text = (run / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    return [r for r in records if kind is None or r["kind"] == kind]

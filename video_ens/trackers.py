"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases and MLflow (recipe train.loggers).

    check_available(recipe.train.loggers)          # before launch: RecipeError naming the pip extra to install
    trackers = open_trackers(recipe.train.loggers, run_dir=run_dir, config=recipe_to_dict(recipe))   # rank 0 only
    for t in trackers: t.log({"train/loss": 0.31, "train/lr": 0.05}, step=20)
    for t in trackers: t.close()

The trainer's MetricsLog drives them: every scalar it writes to TensorBoard goes to each tracker under the same
name. Each tracker run gets the resolved recipe as its config, and its id is kept in RUN_DIR/trackers.json, so a
resumed run (or a MAX_RESTARTS restart) goes on in the same tracker run instead of starting a second one. The
trackers' own offline modes are left to them: WANDB_MODE=offline writes under RUN_DIR/wandb for a later `wandb
sync`; MLflow logs to MLFLOW_TRACKING_URI, or without one to a file store in RUN_DIR/mlruns (`mlflow ui
--backend-store-uri RUN_DIR/mlruns`). wandb and mlflow are optional extras, imported here and nowhere else.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Protocol

from .config import TRACKERS, RecipeError, flatten_recipe
from .durable import write_atomic

__all__ = ["IDS_FILE", "MlflowTracker", "Tracker", "WandbTracker", "check_available", "flat_params", "open_trackers"]

IDS_FILE = "trackers.json"
DEFAULT_PROJECT = "video_ens"  # W&B project / MLflow experiment when WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME are unset

# MLflow keeps a parameter value up to 6000 characters since 2.x but 500 in older servers and file stores; a
# recipe's longest values (the description, model.options) are cut to the older limit so that any server takes them.
MLFLOW_PARAM_CHARS = 500


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_available(names: list[str] | tuple[str, ...]) -> None:
    """RecipeError for each tracker of train.loggers whose package is not installed, naming the pip extra.

    Looks the package up without importing it (importing wandb takes seconds), so the launch check stays quick."""
    for name in names:
        if name not in TRACKERS:  # config's check already refuses these; kept for callers with a hand-made list
            raise RecipeError(f"train.loggers: unknown tracker {name!r}; the trackers are {TRACKERS}")
        if importlib.util.find_spec(name) is None:
            raise RecipeError(
                f"train.loggers: {name!r} is listed but the {name} package is not installed in this environment: "
                f"pip install 'video_ens[{name}]' (or pip install {name}), or remove it from train.loggers"
            )


def open_trackers(names, *, run_dir: str | os.PathLike, config: dict) -> list[Tracker]:
    """One started tracker per name, in order; the ids of their runs are read from and kept in RUN_DIR/trackers.json.
    Call on rank 0 only."""
    check_available(names)
    run_dir = Path(run_dir)
    path = run_dir / IDS_FILE
    try:
        ids = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        ids = {}
    trackers: list[Tracker] = []
    for name in names:
        cls = {"wandb": WandbTracker, "mlflow": MlflowTracker}[name]
        tracker = cls(run_dir=run_dir, config=config, name=run_dir.resolve().name, run_id=ids.get(name))
        trackers.append(tracker)
        if ids.get(name) != tracker.run_id:
            ids[name] = tracker.run_id
            write_atomic(path, json.dumps(ids, indent=1, sort_keys=True) + "\n")
    return trackers


def flat_params(config: dict) -> dict[str, str]:
    """{"optim.lr": "0.05", "model.options": "{...}", ...}: the recipe as MLflow parameters, flattened as the resume
    check flattens it (config.flatten_recipe), values as JSON text."""
    return {
        k: (v if isinstance(v, str) else json.dumps(v))[:MLFLOW_PARAM_CHARS] for k, v in flatten_recipe(config).items()
    }


class WandbTracker:
    """A Weights & Biases run. WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE (offline) and WANDB_API_KEY are wandb's own
    environment and are honoured as it reads them; files go under RUN_DIR/wandb."""

    def __init__(self, *, run_dir: Path, config: dict, name: str, run_id: str | None) -> None:
        import wandb

        self.run_id = run_id or secrets.token_hex(4)  # W&B ids: letters and digits, unique within a project
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=name,
            id=self.run_id,
            resume="allow",  # the same id after a restart continues that run
            dir=str(run_dir),
            config=config,
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        # W&B drops steps at or below the last one it has; after a resume the steps an earlier attempt logged past
        # the checkpoint are logged again and kept by metrics.jsonl and TensorBoard only.
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    """An MLflow run in experiment MLFLOW_EXPERIMENT_NAME (default "video_ens"), on MLFLOW_TRACKING_URI or a file store
    in RUN_DIR/mlruns. The recipe becomes the run's parameters (flattened; a resume adds only parameters the run
    does not have, since MLflow refuses to change one) and its artifact recipe.json (the latest start's)."""

    def __init__(self, *, run_dir: Path, config: dict, name: str, run_id: str | None) -> None:
        import mlflow

        self._mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # Offline, beside the run. MLflow 3.x keeps the file store only on request (it points to a database
            # backend, which mlflow-skinny, our extra, cannot run); a lab's server or database comes in through
            # MLFLOW_TRACKING_URI instead.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(run_dir) / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
        self.run_id = run.info.run_id
        have = set(run.data.params) if run_id else set()
        params = {k: v for k, v in flat_params(config).items() if k not in have}
        if params:
            mlflow.log_params(params)
        mlflow.log_dict(config, "recipe.json")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self._mlflow.end_run()

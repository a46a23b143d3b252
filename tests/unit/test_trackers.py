"""train.loggers: the W&B and MLflow adapters (video_ens/trackers.py) behind the trainer's MetricsLog, checked
against stand-in `wandb` and `mlflow` modules that record every call; the real packages run too where installed
(they are optional extras, not in the CI environment)."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import os
import sys
import types
from pathlib import Path

import pytest

from video_ens import trackers
from video_ens.config import RecipeError, recipe_from_dict, recipe_to_dict
from video_ens.trainer import MetricsLog


def _recipe(**train):
    return recipe_from_dict({"model": {"name": "s3dg_tiny"}, "data": {"train_shards": "d/train", "val_shards": "d/val"},
                             "optim": {"lr": 0.05}, "train": train})  # fmt: skip


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # so importlib.util.find_spec sees it installed
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """Stand-in wandb and mlflow modules; `calls` lists (module, function, args, kwargs) in call order."""
    calls: list[tuple] = []
    mlflow_runs: dict[str, dict] = {}  # run id -> params, what an MLflow store keeps across starts

    def rec(module: str, fn: str):
        return lambda *a, **kw: calls.append((module, fn, a, kw))

    class WandbRun:
        log = staticmethod(rec("wandb", "run.log"))
        finish = staticmethod(rec("wandb", "run.finish"))

    def wandb_init(**kw):
        calls.append(("wandb", "init", (), kw))
        return WandbRun()

    def start_run(run_id=None, run_name=None):
        calls.append(("mlflow", "start_run", (), {"run_id": run_id, "run_name": run_name}))
        run_id = run_id or f"run{len(mlflow_runs)}"
        params = mlflow_runs.setdefault(run_id, {})
        return types.SimpleNamespace(
            info=types.SimpleNamespace(run_id=run_id), data=types.SimpleNamespace(params=dict(params))
        )

    def log_params(params):
        calls.append(("mlflow", "log_params", (params,), {}))
        mlflow_runs[next(reversed(mlflow_runs))].update(params)

    monkeypatch.setitem(sys.modules, "wandb", _module("wandb", init=wandb_init))
    monkeypatch.setitem(sys.modules, "mlflow", _module(
        "mlflow", set_tracking_uri=rec("mlflow", "set_tracking_uri"), set_experiment=rec("mlflow", "set_experiment"),
        start_run=start_run, log_params=log_params, log_dict=rec("mlflow", "log_dict"),
        log_metrics=rec("mlflow", "log_metrics"), end_run=rec("mlflow", "end_run")))  # fmt: skip
    _unset(monkeypatch, "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setenv("RANK", "0")
    return calls


def _unset(monkeypatch, *names: str) -> None:
    """Remove environment variables, and remove them again after the test (the file store's opt-in is set by the
    adapter; monkeypatch.delenv alone would not undo a variable that was absent)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _of(calls, module: str, fn: str) -> list[tuple]:
    return [(a, kw) for m, f, a, kw in calls if (m, f) == (module, fn)]


def test_each_tracker_gets_the_recipe_once_the_scalars_with_steps_and_a_finish(fakes, tmp_path):
    recipe = _recipe(loggers=["wandb", "mlflow"])
    config = recipe_to_dict(recipe)
    log = MetricsLog(tmp_path, loggers=recipe.train.loggers, config=config)
    log.write("train", 10, {"loss": 0.5, "branch": [0.25, 0.75], "lr": 0.05, "bad": float("nan"), "note": "text"})
    log.write("resume", 10, {"changed": ["train.max_steps: 4 -> 8"]})  # no numbers: nothing to send
    log.write("eval", 20, {"ensemble": {"top1": 0.875}, "branches": [{"top1": 0.75}]})
    log.close()

    ids = json.loads((tmp_path / trackers.IDS_FILE).read_text())
    (_, init), = _of(fakes, "wandb", "init")  # fmt: skip
    assert init == {"project": "video_ens", "name": tmp_path.name, "id": ids["wandb"], "resume": "allow",
                    "dir": str(tmp_path), "config": config}  # fmt: skip
    train = {"train/loss": 0.5, "train/branch/0": 0.25, "train/branch/1": 0.75, "train/lr": 0.05}
    evaluation = {"eval/ensemble/top1": 0.875, "eval/branches/0/top1": 0.75}
    assert _of(fakes, "wandb", "run.log") == [((train,), {"step": 10}), ((evaluation,), {"step": 20})]
    assert _of(fakes, "wandb", "run.finish") == [((), {})]

    assert _of(fakes, "mlflow", "set_tracking_uri") == [(((tmp_path / "mlruns").resolve().as_uri(),), {})]
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # MLflow 3 refuses a file store without it
    assert _of(fakes, "mlflow", "set_experiment") == [(("video_ens",), {})]
    assert _of(fakes, "mlflow", "start_run") == [((), {"run_id": None, "run_name": tmp_path.name})]
    (params,), _ = _of(fakes, "mlflow", "log_params")[0]
    assert len(_of(fakes, "mlflow", "log_params")) == 1
    assert params["optim.lr"] == "0.05" and params["train.loggers"] == '["wandb", "mlflow"]'
    assert params["model.name"] == "s3dg_tiny" and params["model.options"] == "{}"
    assert _of(fakes, "mlflow", "log_dict") == [((config, "recipe.json"), {})]
    assert _of(fakes, "mlflow", "log_metrics") == [((train,), {"step": 10}), ((evaluation,), {"step": 20})]
    assert _of(fakes, "mlflow", "end_run") == [((), {})]
    assert ids["mlflow"] == "run0"
    # metrics.jsonl stays the full record, strings and NaN included
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["train", "resume", "eval"] and lines[0]["note"] == "text"


def test_a_resumed_run_goes_on_in_the_same_tracker_runs(fakes, tmp_path):
    first = recipe_to_dict(_recipe(loggers=["wandb", "mlflow"], max_steps=4))
    MetricsLog(tmp_path, loggers=["wandb", "mlflow"], config=first).close()
    ids = json.loads((tmp_path / trackers.IDS_FILE).read_text())
    fakes.clear()
    again = recipe_to_dict(_recipe(loggers=["wandb", "mlflow"], max_steps=8))
    again["train"]["added_later"] = 1  # a field the first start did not have
    MetricsLog(tmp_path, loggers=["wandb", "mlflow"], config=again).close()
    (_, init), = _of(fakes, "wandb", "init")  # fmt: skip
    assert init["id"] == ids["wandb"] and init["resume"] == "allow" and init["config"] == again
    assert _of(fakes, "mlflow", "start_run") == [((), {"run_id": ids["mlflow"], "run_name": None})]
    # MLflow refuses to change a parameter: only the new one is added; the new recipe is the artifact
    assert _of(fakes, "mlflow", "log_params") == [(({"train.added_later": "1"},), {})]
    assert _of(fakes, "mlflow", "log_dict") == [((again, "recipe.json"), {})]
    assert json.loads((tmp_path / trackers.IDS_FILE).read_text()) == ids


def test_environment_settings_are_honoured(fakes, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "k400")
    monkeypatch.setenv("WANDB_PROJECT", "ensembles")
    MetricsLog(tmp_path, loggers=["mlflow", "wandb"], config={}).close()
    assert _of(fakes, "mlflow", "set_tracking_uri") == []  # mlflow reads MLFLOW_TRACKING_URI itself
    assert _of(fakes, "mlflow", "set_experiment") == [(("k400",), {})]
    assert _of(fakes, "wandb", "init")[0][1]["project"] == "ensembles"


def test_only_rank_0_starts_trackers(fakes, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log = MetricsLog(tmp_path, loggers=["wandb", "mlflow"], config={})
    log.write("train", 1, {"loss": 1.0})
    log.close()
    assert fakes == [] and not (tmp_path / trackers.IDS_FILE).exists()


def test_a_tracker_that_fails_mid_run_is_dropped_and_training_logs_go_on(fakes, tmp_path, caplog):
    def broken(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    log = MetricsLog(tmp_path, loggers=["mlflow", "wandb"], config={})
    sys.modules["mlflow"].log_metrics = broken
    with caplog.at_level(logging.WARNING, logger="video_ens.trainer"):
        log.write("train", 1, {"loss": 1.0})
        log.write("train", 2, {"loss": 0.5})
    log.close()
    warnings = [r.getMessage() for r in caplog.records if "train.loggers" in r.getMessage()]
    assert len(warnings) == 1 and "mlflow failed at step 1" in warnings[0] and "unreachable" in warnings[0]
    assert [kw["step"] for _, kw in _of(fakes, "wandb", "run.log")] == [1, 2]  # the other tracker goes on
    assert len(_of(fakes, "mlflow", "end_run")) == 1  # and the failed one's run is still ended
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_listed_tracker_that_is_not_installed_stops_the_launch_check(monkeypatch):
    from video_ens.train import check_before_launch

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(sys, "path", [])  # nothing importable from any folder: wandb is not installed
    with pytest.raises(RecipeError, match=r"train.loggers: 'wandb' is listed but the wandb package is not installed "
                                          r"in this environment: pip install 'video_ens\[wandb\]'"):  # fmt: skip
        trackers.check_available(["wandb"])
    # before any data is looked at (these shard folders do not exist)
    with pytest.raises(RecipeError, match=r"video_ens\[wandb\]"):
        check_before_launch(_recipe(loggers=["wandb"]), {"kind": "clip"}, world_size=1, run_dir=None)


def test_recipe_checks_of_train_loggers():
    assert _recipe().train.loggers == []
    for value, message in ((["tensorboard"], "is always on"), (["neptune"], "unknown tracker 'neptune'"),
                           (["mlflow", "mlflow"], "lists a tracker twice")):  # fmt: skip
        with pytest.raises(RecipeError, match=f"train.loggers: .*{message}"):
            _recipe(loggers=value)


def _real(name: str):
    return pytest.importorskip(name, reason=f"{name} is an optional extra (pip install 'video_ens[{name}]'), not "
                                            "installed here")  # fmt: skip


def test_a_real_mlflow_file_store_run(tmp_path, monkeypatch):
    mlflow = _real("mlflow")
    _unset(monkeypatch, "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setenv("RANK", "0")
    config = recipe_to_dict(_recipe(loggers=["mlflow"]))
    for step in (10, 20):  # a first start and a resume
        log = MetricsLog(tmp_path, loggers=["mlflow"], config=config)
        log.write("train", step, {"loss": step / 100})
        log.close()
    run_id = json.loads((tmp_path / trackers.IDS_FILE).read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.05"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(10, 0.1), (20, 0.2)]


def test_a_real_wandb_offline_run(tmp_path, monkeypatch):
    _real("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("RANK", "0")
    log = MetricsLog(tmp_path, loggers=["wandb"], config=recipe_to_dict(_recipe(loggers=["wandb"])))
    log.write("train", 10, {"loss": 0.1})
    log.close()
    run_id = json.loads((tmp_path / trackers.IDS_FILE).read_text())["wandb"]
    runs = list(Path(tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))

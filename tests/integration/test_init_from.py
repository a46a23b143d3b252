"""model.init_from end to end: a trained tiny run's weights (its model.safetensors and its DeepSpeed checkpoint)
evaluate to the run's own metrics in a fresh model; a baseline initialises a two-branch run, which logs and records
what it loaded per part; the run's own checkpoint wins on resume; a misfit stops the launch check naming tensors.

One tiny ResNet baseline (a single process, 2 steps) is trained for the module; the two-branch run trains 1 step
and is resumed once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launching import assert_ok, train_process, write_recipe
from safetensors.torch import load_file
from tiny_runs import cpu_train, data_section, eval_stream, metrics

from video_ens import engine, train
from video_ens.config import load_recipe
from video_ens.data import loader
from video_ens.evaluate import evaluate
from video_ens.models import create_model
from video_ens.weights import init_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(demo_data) -> Path:
    return demo_data("images", num_train=32, num_val=12, shard_size=8)


def _recipe(images: Path, model: dict, zero: int = 1, **train_fields) -> dict:
    return {
        "description": "test: tiny ResNet, init_from",
        "model": {"options": {"image_size": 32}, **model},
        "data": data_section("image", images),
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant"},
        "train": cpu_train(max_steps=2, global_batch_size=8) | train_fields,
        "eval": {"batch_size": 4},
        "deepspeed": {"zero_stage": zero},
    }


def _train(recipe: dict, run: Path):
    """`python -m video_ens.train` as one process (no torchrun) on `recipe`, written beside the run folder."""
    path = write_recipe(recipe, run.parent / f"{run.name}.json")
    out = train_process(path, "--run-dir", str(run))
    assert_ok(out)
    return path, out.stderr


@pytest.fixture(scope="module")
def baseline(images, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe file, run folder) of a finished 2-step one-branch run: model.safetensors and checkpoint step 2. ZeRO-3,
    so the checkpoint's module file holds empty parameters and checkpoint_weights must rebuild them from the
    partitions, independently of the export (zero_to_fp32) that wrote model.safetensors."""
    run = tmp_path_factory.mktemp("runs") / "baseline"
    path, _ = _train(_recipe(images, {"name": "resnet_tiny"}, zero=3), run)
    return path, run


def test_the_runs_weights_evaluate_to_its_metrics_in_a_fresh_model(baseline):
    path, run = baseline
    recipe = load_recipe(path)
    saved = json.loads((run / "eval.json").read_text())
    step, checkpoint = engine.latest_checkpoint(run / "checkpoints")
    assert step == 2
    final = load_file(str(run / "model.safetensors"))
    from_checkpoint = engine.checkpoint_weights(checkpoint)
    assert set(from_checkpoint) == set(final)
    assert all(torch.equal(from_checkpoint[k], v) for k, v in final.items()), "the checkpoint is not the final weights"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run evaluated (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        for source in (run, checkpoint):
            torch.manual_seed(1234)  # other random weights than the run started from
            model = train.build_model(recipe)
            report = init_model(model, source)
            assert all(c["new"] == 0 for c in report.parts.values())
            assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
            stream = eval_stream(recipe, model, loader.resolve_paths(recipe.data))
            try:
                result = evaluate(
                    model,
                    stream,
                    task=loader.metrics_task(recipe.data),
                    top_k=recipe.eval.top_k,
                    device=torch.device("cpu"),
                    precision=recipe.train.precision,
                    log_every=0,
                )
            finally:
                stream.close()
            assert result["num_samples"] == saved["num_samples"] == 12
            assert result["ensemble"] == saved["ensemble"] and result["branches"] == saved["branches"], source
    finally:
        torch.set_num_threads(threads)


def test_a_baseline_starts_a_two_branch_run_and_its_resume_keeps_its_own_weights(images, baseline, tmp_path):
    _, source = baseline
    model = {
        "name": "resnet_tiny",
        "num_branches": 2,
        "width_ratio": 1.0,
        "init_from": str(source),
        "init_exclude": ["branches.*.fc.*"],
    }
    run = tmp_path / "two_branch"
    path, log = _train(_recipe(images, model, max_steps=1), run)
    assert f"initialised from {source / 'model.safetensors'} (the final weights of run folder {source})" in log
    (init,) = metrics(run, "init")
    with torch.device("meta"):
        names = list(create_model("resnet_tiny", num_branches=2, width_ratio=1.0).state_dict())
    base = sum(n.startswith("base.") for n in names)
    branch = sum(n.startswith("branches.0.") for n in names)
    assert init["parts"]["base"] == {
        "tensors": base,
        "loaded": base,
        "loaded_values": init["parts"]["base"]["loaded_values"],
        "excluded": 0,
        "new": 0,
        "new_values": 0,
    }
    for b in ("branch 0", "branch 1"):
        part = init["parts"][b]
        assert (part["tensors"], part["loaded"], part["excluded"], part["new"]) == (branch, branch - 2, 2, 2)
        assert part["new_values"] == 10 * 256 + 10  # the fresh classifier: 10 classes x 256 features, and its bias
        assert f"  {b:<10} {branch:>8} {branch - 2:>8}" in log  # the start-of-run table
    assert init["from"] == {"base": ["base"], "branch 0": ["branch 0"], "branch 1": ["branch 0"]}
    assert init["identical_branches"] == [] and init["exclude"] == ["branches.*.fc.*"]
    # the relaunch resumes from its own step-1 checkpoint, whose weights win over init_from
    _, log = _train(_recipe(images, model, max_steps=2), run)
    assert f"model.init_from ({source}) is not applied: this run resumes from its own checkpoint step_000000001" in log
    records = metrics(run)
    assert [r["kind"] for r in records].count("init") == 1
    assert [r["step"] for r in records if r["kind"] == "resume"] == [1]
    # a ZeRO-1 checkpoint keeps the whole module: what init_from reads from it is the run's final export
    final, saved = (
        load_file(str(run / "model.safetensors")),
        engine.checkpoint_weights(run / "checkpoints" / "step_000000002"),
    )
    assert set(saved) == set(final) and all(torch.equal(saved[k], v) for k, v in final.items())


def test_the_launch_check_refuses_narrower_branches_naming_the_tensors(images, baseline, tmp_path, capsys):
    _, source = baseline
    path = tmp_path / "narrow.json"
    write_recipe(_recipe(images, {"name": "resnet_tiny_ens2", "init_from": str(source)}), path)
    assert train.main([str(path), "--check", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model.init_from:" in err and "tensor(s) of another shape" in err
    assert "branches.0.block3.unit1.conv1.weight (22, 64, 1, 1) <- branches.0.block3.unit1.conv1.weight" in err
    write_recipe(
        _recipe(images, {"name": "resnet_tiny_ens2", "init_from": str(source), "init_exclude": ["branches.*"]}), path
    )
    assert train.main([str(path), "--check", "--run-dir", str(tmp_path / "run")]) == 0

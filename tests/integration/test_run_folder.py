"""Run folders are owned: one launch at a time, a resume only of the same recipe, recipe.json rewritten only after
that check, tools/eval.py never over the training outputs, default folder names that differ across seeds and
overrides, and the checks that need no process group made before torchrun starts (data paths included).

One tiny ResNet run (a single process, 2 steps, ~7 s) is trained once for the module and copied where a test
changes it; the other launches are refused before they train, or train one step.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
from launching import assert_ok, kill_job, launch_sh, run_command, run_tool, train_process, write_recipe
from tiny_runs import cpu_train, data_section, metrics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(demo_data) -> Path:
    return demo_data("images", num_train=32, num_val=8, shard_size=8)


def _recipe(images: Path, **train) -> dict:
    return {
        "description": "test: tiny ResNet, run folder ownership",
        "model": {"name": "resnet_tiny_ens2", "options": {"image_size": 32}},
        "data": data_section("image", images),
        "optim": {"name": "sgd", "lr": 0.05, "schedule": "constant"},
        "train": cpu_train(max_steps=2, global_batch_size=8) | train,
        "eval": {"batch_size": 4},
    }


RECIPE = "tiny_resnet.json"  # the default run folder is runs/tiny_resnet


def _launch(recipe: Path, *args: str, cwd: Path, background: bool = False, timeout: float = 300):
    """launch.sh on one process."""
    return launch_sh(recipe, *args, nproc=1, cwd=cwd, background=background, timeout=timeout)


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in metrics(run, "train")]


def _snapshot(run: Path) -> dict[str, bytes]:
    """The training outputs' bytes, to show that a refused launch changed none of them."""
    return {name: (run / name).read_bytes() for name in ("recipe.json", "metrics.jsonl", "eval.json")}


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory) -> tuple[Path, Path]:
    """(working folder, run folder): a finished 2-step run under the default name, started from the working folder."""
    work = tmp_path_factory.mktemp("work")
    recipe = write_recipe(_recipe(images), work / RECIPE)
    assert_ok(train_process(recipe, cwd=work))
    run = work / "runs" / "tiny_resnet"
    assert (run / "checkpoints").is_dir() and (run / "eval.json").is_file()
    return work, run


def _copy(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the finished run (and its recipe file) for a test that changes it."""
    work, run = finished
    shutil.copytree(work, tmp_path / "work", symlinks=True)
    return tmp_path / "work", tmp_path / "work" / "runs" / run.name


def test_a_second_launch_on_a_running_folder_fails_at_once_naming_host_and_pid(images, tmp_path):
    """While a run holds its folder, launching again on it (through launch.sh, or torchrun directly with two ranks)
    fails within seconds with the owner's host and pid, before anything is written; launch.sh refuses before
    torchrun starts."""
    recipe = write_recipe(_recipe(images, max_steps=100_000, epochs=100_000), tmp_path / RECIPE)
    run = tmp_path / "run"
    first = _launch(recipe, "--run-dir", str(run), cwd=tmp_path, background=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").exists() and _train_steps(run)):
            if first.poll() is not None:
                pytest.fail(f"the first run ended early: {first.stdout.read()[-3000:]}")
            assert time.monotonic() < deadline, "the first run logged no step in 300 s"
            time.sleep(0.2)
        owner = json.loads((run / ".lock").read_text())
        events = sorted((run / "tb").iterdir())  # a launch that got as far as logging would add its own

        start = time.monotonic()
        second = _launch(recipe, "--run-dir", str(run), cwd=tmp_path, timeout=120)
        took = time.monotonic() - start
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"pid {owner['pid']} on host {socket.gethostname()}" in second.stderr, second.stderr
        assert "launch:" not in second.stdout, "torchrun must not have been started"
        assert took < 30, f"the refusal took {took:.1f} s"

        # torchrun without launch.sh: rank 0 finds the folder locked, and both ranks leave with that error
        direct = run_command(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "video_ens.train",
                str(recipe),
                "--run-dir",
                str(run),
            ],
            cwd=tmp_path,
            timeout=120,
        )
        assert direct.returncode != 0
        assert f"pid {owner['pid']} on host {socket.gethostname()}" in direct.stderr, direct.stderr[-3000:]
        assert first.poll() is None, "the first run must go on"
        assert sorted((run / "tb").iterdir()) == events
    finally:
        kill_job(first)
        first.wait(timeout=60)


def test_resuming_a_different_recipe_is_refused_unless_forced(finished, tmp_path):
    """A relaunch on a run folder whose checkpoint another recipe wrote (here another seed) is refused with the
    differing field named, by launch.sh before torchrun and by the rank itself, and leaves recipe.json, metrics
    and eval.json as they were. Extending the run (train.max_steps) is a resume; train.resume=force resumes
    anyway, and only then is recipe.json rewritten."""
    work, run = _copy(finished, tmp_path)
    recipe = work / RECIPE
    before = _snapshot(run)

    out = _launch(recipe, "--run-dir", str(run), "--set", "train.seed=1", cwd=work)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "train.seed: 0 -> 1" in out.stderr and "train.resume=force" in out.stderr, out.stderr
    assert "launch:" not in out.stdout, "torchrun must not have been started"
    assert _snapshot(run) == before

    out = train_process(recipe, "--run-dir", str(run), "--set", "train.seed=1", cwd=work)  # the rank's own check
    assert out.returncode == 2 and "train.seed: 0 -> 1" in out.stderr, out.stderr[-3000:]
    assert _snapshot(run) == before

    # a recipe.json that names the new seed (as the old overwrite-before-restore left it) is not enough: the
    # checkpoint it would resume says seed 0
    lie = json.loads(before["recipe.json"])
    lie["train"]["seed"] = 1
    (run / "recipe.json").write_text(json.dumps(lie))
    out = train_process(recipe, "--run-dir", str(run), "--set", "train.seed=1", cwd=work)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "(its checkpoint step_000000002): train.seed: 0 -> 1" in out.stderr, out.stderr[-3000:]
    assert json.loads((run / "recipe.json").read_text()) == lie
    (run / "recipe.json").write_bytes(before["recipe.json"])

    assert_ok(train_process(recipe, "--run-dir", str(run), "--set", "train.max_steps=3", cwd=work))
    assert _train_steps(run) == [1, 2, 3]
    assert json.loads((run / "recipe.json").read_text())["train"]["max_steps"] == 3

    assert_ok(
        train_process(
            recipe,
            "--run-dir",
            str(run),
            "--set",
            "train.seed=1",
            "--set",
            "train.resume=force",
            "--set",
            "train.max_steps=4",
            cwd=work,
        )
    )
    assert _train_steps(run) == [1, 2, 3, 4]
    resumed = json.loads((run / "recipe.json").read_text())["train"]
    assert (resumed["seed"], resumed["resume"]) == (1, "force")


def test_default_run_folder_differs_across_seeds(finished, tmp_path):
    """Without --run-dir, `--set train.seed=1` trains a run of its own instead of resuming the seed-0 run of the
    same recipe file; an override that only extends the run keeps the folder."""
    work, run = _copy(finished, tmp_path)
    recipe = work / RECIPE
    before = _snapshot(run)
    out = train_process(recipe, "--set", "train.seed=1", cwd=work)
    assert_ok(out)
    assert "resumed from" not in out.stderr
    assert _snapshot(run) == before
    others = [p for p in (work / "runs").iterdir() if p != run]
    assert len(others) == 1 and others[0].name.startswith("tiny_resnet-"), others
    assert json.loads((others[0] / "recipe.json").read_text())["train"]["seed"] == 1
    assert _train_steps(others[0]) == [1, 2]


def test_eval_tool_never_overwrites_the_training_outputs(finished, tmp_path):
    """tools/eval.py on a run folder writes into RUN/eval/<mode>/ by default, and refuses --out RUN."""
    work, run = _copy(finished, tmp_path)
    before = _snapshot(run)
    out = run_tool("eval", "--run-dir", str(run), "--out", str(run))
    assert out.returncode == 2 and "training outputs" in out.stderr, out.stderr[-2000:]
    run_tool("eval", "--run-dir", str(run), check=True)
    assert _snapshot(run) == before
    ours = json.loads((run / "eval" / "center_crop" / "eval.json").read_text())
    assert ours["num_samples"] == json.loads(before["eval.json"])["num_samples"]


def test_a_missing_dataset_is_one_line_before_torchrun(images, tmp_path):
    """A data path that does not exist stops launch.sh with the project's one-line error, before torchrun (whose
    ChildFailedError traceback used to bury it)."""
    recipe = _recipe(images)
    recipe["data"]["train_shards"] = str(tmp_path / "nowhere")
    path = write_recipe(recipe, tmp_path / RECIPE)
    out = _launch(path, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"data.train_shards: {tmp_path / 'nowhere'}" in out.stderr, out.stderr
    assert "launch:" not in out.stdout, "torchrun must not have been started"
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr
    assert not (tmp_path / "run").exists()

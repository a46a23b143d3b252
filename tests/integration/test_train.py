"""End-to-end training on CPU: two gloo ranks through launch.sh/torchrun, DeepSpeed ZeRO-1 and -2.

Golden per-step losses (tests/assets/golden_losses.json) pin the whole numeric path: data stream, augmentation,
model, loss, optimizer, engine. Regenerate them deliberately with `UPDATE_GOLDEN=1 bash tools/test.sh
tests/integration/test_train.py` after a change that is meant to alter the numbers, and say why in the commit.
Independent of the golden file, ZeRO-1 and ZeRO-2 must agree with each other, and a run killed with SIGKILL and
restarted must end with exactly the losses of an uninterrupted run.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launching import ROOT, descendants, free_port, kill_job, launch, launch_env, run_tool
from tiny_runs import cpu_train, data_section, metrics

pytestmark = pytest.mark.integration

GOLDEN = ROOT / "tests" / "assets" / "golden_losses.json"
STEPS = 4
RTOL = 2e-4  # same torch build and thread count; a changed formula moves losses by far more


def _recipe(family: str, demo_data, *, zero: int, steps: int = STEPS, **train) -> dict:
    """A family's tiny model on its demo dataset (conftest.py's demo_data: made the first time a test asks for it,
    through the real converters, once per session)."""
    if family == "s3dg":
        kinetics = demo_data("kinetics", num_train=48, num_val=12, shard_size=8)
        data = data_section("clip", kinetics, frame_stride=2, flip=False)
    elif family == "dbof":
        data = data_section("features", demo_data("yt8m", num_train=64, num_validate=24, shard_size=16))
    else:
        data = data_section("image", demo_data("images", num_train=64, num_val=16, shard_size=16))
    model = {
        "s3dg": {"name": "s3dg_tiny_ens2"},
        "dbof": {"name": "dbof_tiny_ens2"},
        "resnet": {"name": "resnet_tiny_ens2", "options": {"image_size": 32}},
    }[family]
    loss = "sigmoid_bce" if family == "dbof" else "softmax_ce"
    return {
        "description": f"test: tiny {family}, 2 ranks, ZeRO-{zero}",
        "model": model,
        "data": data,
        "objective": {"structure": "codistillation", "weight": 2.0, "loss": loss},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant"},
        "train": cpu_train(max_steps=steps, global_batch_size=8, checkpoint_every=0, seed=0) | train,
        "deepspeed": {"zero_stage": zero},
        "eval": {"mode": "full", "max_frames": 32, "batch_size": 4},
    }


def _losses(run_dir: Path) -> dict[int, float]:
    """Per-step total loss from metrics.jsonl; a step logged twice (before a kill and after resume) keeps the last."""
    return {r["step"]: r["loss"] for r in metrics(run_dir, "train")}


FAMILIES = ["s3dg", "dbof", "resnet"]


@pytest.fixture(scope="session")
def trained(demo_data, tmp_path_factory):
    """Every (family, ZeRO stage) run once per session; tests read their run folders."""
    runs = {}
    base = tmp_path_factory.mktemp("runs")

    def get(family: str, zero: int) -> Path:
        if (family, zero) not in runs:
            run_dir = base / f"{family}_zero{zero}"
            launch(_recipe(family, demo_data, zero=zero), run_dir, check=True)
            runs[family, zero] = run_dir
        return runs[family, zero]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_zero1_and_zero2_train_identically_and_match_golden(family, trained):
    one, two = _losses(trained(family, 1)), _losses(trained(family, 2))
    assert sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=RTOL), f"ZeRO-1 vs ZeRO-2 at step {step}"
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden[family] = [one[s] for s in sorted(one)]
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert family in golden, f"no golden losses for {family}: run with UPDATE_GOLDEN=1 once"
    assert [one[s] for s in sorted(one)] == pytest.approx(golden[family], rel=RTOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_run_folder_outputs(family, trained):
    run = trained(family, 1)
    for name in ("recipe.json", "metrics.jsonl", "eval.json", "model.safetensors"):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir()), "TensorBoard events"
    result = json.loads((run / "eval.json").read_text())
    assert len(result["branches"]) == 2
    expect = {"gap", "map", "hit_at_one"} if family == "dbof" else {"top1", "top5"}
    assert set(result["ensemble"]) >= expect
    from video_ens.data.schema import read_info

    recipe = json.loads((run / "recipe.json").read_text())
    assert result["num_samples"] == read_info(recipe["data"]["val_shards"]).num_samples  # each video once
    # the consolidated weights load into a fresh model without DeepSpeed
    from safetensors.torch import load_file

    from video_ens.config import load_recipe
    from video_ens.models import create_model

    resolved = load_recipe(run / "recipe.json")
    model = create_model(resolved.model.name, **resolved.model.builder_kwargs())
    model.load_state_dict(load_file(str(run / "model.safetensors")), strict=True)  # raises on any key mismatch


RESUME_STEPS = 8


@pytest.fixture(scope="session")
def uninterrupted(demo_data, tmp_path_factory):
    """The per-step losses of the resume tests' recipe, run without interruption."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    launch(_resume_recipe(demo_data), run, check=True)
    return _losses(run)


def _resume_recipe(demo_data, *, num_workers: int = 0, **train) -> dict:
    recipe = _recipe("s3dg", demo_data, zero=1, steps=RESUME_STEPS, checkpoint_every=2, **train)
    recipe["data"]["num_workers"] = num_workers
    return recipe


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"step {step} not reached in {timeout} s")


def _worker_of_rank(proc: subprocess.Popen, rank: int) -> int:
    for pid in descendants(proc.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in env):
            return pid
    raise AssertionError(f"no worker process with RANK={rank} under {proc.pid}")


def test_elastic_restart_after_one_rank_is_killed(demo_data, uninterrupted, tmp_path):
    """SIGKILL one rank mid-run under torchrun --max-restarts: the agent restarts the worker group, which resumes
    from the newest complete checkpoint and finishes with the uninterrupted per-step losses, exit code 0."""
    run = tmp_path / "elastic"
    env = launch_env(NPROC="2", MASTER_PORT=str(free_port()), MAX_RESTARTS="1")
    proc = launch(_resume_recipe(demo_data), run, env=env, background=True)
    try:
        _wait_for_step(run, proc, 3)
        os.kill(_worker_of_rank(proc, 1), signal.SIGKILL)
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 0, out[-4000:]
    assert len(metrics(run, "train")) > RESUME_STEPS, "steps after the checkpoint should have run twice"
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, RESUME_STEPS + 1))
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([uninterrupted[s] for s in sorted(resumed)], rel=1e-6)


def test_kill_and_resume_reproduces_the_uninterrupted_losses(demo_data, uninterrupted, tmp_path):
    """SIGKILL the whole job after step 5 (a checkpoint exists at step 4, maybe one in flight at 6), restart the
    same command: it resumes from the newest complete checkpoint and logs the same per-step losses."""
    steps = RESUME_STEPS
    recipe = _resume_recipe(demo_data)
    run = tmp_path / "killed"
    proc = launch(recipe, run, background=True)
    victims: list[int] = []
    try:
        _wait_for_step(run, proc, 5)
        victims = kill_job(proc)
    finally:
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(victims) >= 3 and not any(_alive(p) for p in victims), "launcher and both workers must be gone"
    from video_ens.engine import latest_checkpoint

    lines_before = len(metrics(run, "train"))
    resume_from = latest_checkpoint(run / "checkpoints")
    assert resume_from is not None and resume_from[0] < steps, "the kill came too late to test anything"
    launch(recipe, run, check=True)
    resumed, expect = _losses(run), uninterrupted
    assert sorted(resumed) == sorted(expect) == list(range(1, steps + 1))
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([expect[s] for s in sorted(expect)], rel=1e-6)
    # the restart trained exactly the steps after the newest complete checkpoint, no more, no fewer
    lines_after = len(metrics(run, "train"))
    assert lines_after - lines_before == steps - resume_from[0]
    marks = metrics(run, "resume")
    assert [(m["step"], m["changed"]) for m in marks] == [(resume_from[0], [])]  # same setup: nothing changed


def test_kill_during_a_checkpoint_save_resumes_from_the_previous_one(demo_data, uninterrupted, tmp_path):
    """SIGKILL the whole job while it saves the step-6 checkpoint: every rank's files are written to
    step_6.partial/ but not committed (tests/assets/freeze_in_save freezes rank 0 exactly there). The half-written
    checkpoint is never loaded: the restart removes it, resumes from step 4 and logs the uninterrupted losses."""
    recipe = _resume_recipe(demo_data)
    run = tmp_path / "killed_in_save"
    env = launch_env(NPROC="2", MASTER_PORT=str(free_port()), VIDEO_ENS_FREEZE_IN_SAVE="6")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "assets" / "freeze_in_save"), env.get("PYTHONPATH", "")])
    proc = launch(recipe, run, env=env, background=True)
    marker = run / "frozen_in_save"
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"run ended without reaching the step-6 save: {proc.stdout.read()[-3000:]}")
            assert time.monotonic() < deadline, "the step-6 save was not reached in 300 s"
            time.sleep(0.1)
        time.sleep(0.5)  # rank 0 stops itself right after writing the marker
        victims = kill_job(proc)
    finally:
        proc.wait(timeout=60)
    assert len(victims) >= 3
    from video_ens.engine import PARTIAL, latest_checkpoint, step_tag

    ckpts = run / "checkpoints"
    partial = ckpts / (step_tag(6) + PARTIAL)
    assert partial.is_dir() and any(partial.iterdir()), "the kill should leave a written, uncommitted step 6"
    assert not (partial / "complete.json").exists()
    assert latest_checkpoint(ckpts)[0] == 4, "an uncommitted checkpoint must never count as complete"
    lines_before = len(metrics(run, "train"))

    launch(recipe, run, check=True)  # the same command, without the fault
    assert not partial.exists(), "the restart removes the half-written checkpoint"
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, RESUME_STEPS + 1))
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([uninterrupted[s] for s in sorted(resumed)], rel=1e-6)
    lines_after = len(metrics(run, "train"))
    assert lines_after - lines_before == RESUME_STEPS - 4  # steps 5-8 again, from the step-4 checkpoint


@pytest.fixture(scope="session")
def uninterrupted_with_workers(demo_data, tmp_path_factory):
    """The resume recipe with a data worker per rank, run without interruption (the data order depends on the
    worker count, so the stop tests compare against this one)."""
    run = tmp_path_factory.mktemp("uninterrupted_workers") / "run"
    launch(_resume_recipe(demo_data, num_workers=1), run, check=True)
    return _losses(run)


@pytest.mark.parametrize("how", ["SIGUSR1 to torchrun", "SIGTERM to every process"])
def test_a_stop_signal_checkpoints_the_current_step_and_the_relaunch_goes_on_from_it(
    demo_data, uninterrupted_with_workers, tmp_path, how
):
    """What schedulers send: SIGUSR1 to the launcher (`sbatch --signal=USR1@90`; torchrun used to exit at once on it,
    138, orphaning the ranks), or SIGTERM to every process of the job at once, data workers included (SLURM at
    preemption; a worker that died of it broke its rank's next fetch). Each rank finishes the step in flight, skips
    the evaluation due at that step (eval_every 1: one is due at every step), checkpoints it and exits; the launch
    exits 143. The relaunch runs the skipped evaluation first, resumes from that very step and ends with the
    uninterrupted losses."""
    recipe = _resume_recipe(demo_data, num_workers=1, eval_every=1)
    recipe["eval"]["max_frames"] = 16
    run = tmp_path / "stopped"
    proc = launch(recipe, run, background=True)
    try:
        _wait_for_step(run, proc, 3)
        below = descendants(proc.pid)  # 2 ranks and a data worker each
        if how == "SIGUSR1 to torchrun":
            os.kill(proc.pid, signal.SIGUSR1)  # launch.sh execs torchrun: this is the agent
        else:
            for pid in [proc.pid, *below]:
                os.kill(pid, signal.SIGTERM)
        out = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 143, out[-3000:]
    assert "--shutdown-timeout 120" in out  # torchrun's grace for the save: STOP_GRACE_S, not its 30 s
    assert len(below) >= 4 and not [pid for pid in below if _alive(pid)], "a process of the first launch is left"
    log = metrics(run)
    stops = [r for r in log if r["kind"] == "stop"]
    assert len(stops) == 1 and stops[0]["signal"] == how.split()[0], out[-3000:]
    stopped_at = stops[0]["step"]
    assert 3 <= stopped_at < RESUME_STEPS
    assert stopped_at not in [r["step"] for r in log if r["kind"] == "eval"], "the due evaluation must wait"
    from video_ens.engine import latest_checkpoint

    assert latest_checkpoint(run / "checkpoints")[0] == stopped_at, "the stop step itself must be checkpointed"
    lines_before = sum(r["kind"] == "train" for r in log)

    launch(recipe, run, check=True)
    log = metrics(run)
    resumed_at = next(i for i, r in enumerate(log) if r["kind"] == "resume")
    assert log[resumed_at + 1]["kind"] == "eval" and log[resumed_at + 1]["step"] == stopped_at  # the skipped one
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, RESUME_STEPS + 1))
    expected = uninterrupted_with_workers
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([expected[s] for s in sorted(resumed)], rel=1e-6)
    lines_after = len(metrics(run, "train"))
    assert lines_after - lines_before == RESUME_STEPS - stopped_at  # nothing trained twice, nothing skipped


def test_killing_torchrun_ends_its_ranks_and_their_workers_without_writing(demo_data, tmp_path):
    """SIGKILL to torchrun alone (or the OOM killer choosing it): its ranks run in sessions of their own and trained
    on as orphans, writing checkpoints a relaunch would race. Now they die with it within seconds, data workers too,
    and no checkpoint appears after the kill."""
    recipe = _resume_recipe(demo_data, num_workers=1, max_steps=200)
    run = tmp_path / "orphans"
    proc = launch(recipe, run, background=True)
    try:
        _wait_for_step(run, proc, 3)
        below = descendants(proc.pid)
        assert len(below) >= 4, below  # 2 ranks and a data worker each
        checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in below if Path(f"/proc/{pid}").exists() and _alive(pid)]
        time.sleep(2)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:  # a zombie has ended already
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_two_node_launch_on_localhost(demo_data, tmp_path):
    """NNODES=2 with one process per node, both on this machine: the same command with NODE_RANK 0 and 1."""
    recipe = _recipe("resnet", demo_data, zero=2, steps=2)
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = launch_env(NPROC="1", NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(launch(recipe, tmp_path / "run", env=env, background=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "--nnodes 2 --node-rank 1" in outs[1]
    assert sorted(_losses(tmp_path / "run")) == [1, 2]
    assert (tmp_path / "run" / "eval.json").is_file()


def test_bad_recipe_fails_before_any_process_starts(demo_data, tmp_path):
    recipe = _recipe("resnet", demo_data, zero=1)
    out = launch(recipe, tmp_path / "run", extra=["--set", "optim.lrr=0.1"])
    assert out.returncode == 2
    assert "unknown key 'optim.lrr'; did you mean 'optim.lr'?" in out.stderr
    assert "launch:" not in out.stdout, "torchrun must not have been started"
    recipe["train"]["micro_batch_size"] = 3
    out = launch(recipe, tmp_path / "run")
    assert out.returncode == 2 and "train.micro_batch_size: 3 does not divide global_batch_size 8" in out.stderr
    assert not (tmp_path / "run").exists()


def test_inconsistent_batch_for_the_world_size_is_named(demo_data, tmp_path):
    recipe = _recipe("resnet", demo_data, zero=1)
    recipe["train"].update(global_batch_size=6, micro_batch_size=2, grad_accum_steps=3)  # 2 x 3 x 2 ranks = 12
    out = launch(recipe, tmp_path / "run")
    assert out.returncode == 2
    assert "x world size 2 = 12, not train.global_batch_size 6" in out.stderr
    assert "launch:" not in out.stdout, "torchrun must not have been started"


def test_dry_run_writes_nothing(demo_data, tmp_path):
    """DRY_RUN=1 builds everything and runs one step, leaving no run folder and no scratch folder behind. A GPU
    recipe (sync_bn) can be dry-run on a machine without one: only the GPU-only setting is left unchecked, and said."""
    recipe = _recipe("dbof", demo_data, zero=1, bn_sync="sync_bn")
    env = launch_env(NPROC="1", DRY_RUN="1", MASTER_PORT=str(free_port()), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = launch(recipe, tmp_path / "run", env=env, check=True)
    assert "--dry-run" in out.stdout
    assert 'dry run without CUDA: train.bn_sync "sync_bn" is checked on a GPU only' in out.stderr
    assert not (tmp_path / "run").exists()
    assert not [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("video_ens_dry_run")]


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_tool_on_the_exported_weights_matches_training_eval(family, trained, tmp_path):
    """tools/eval.py on model.safetensors (no DeepSpeed) gives the metrics training reported at its end."""
    run = trained(family, 1)
    run_tool("eval", "--run-dir", str(run), "--out", str(tmp_path), "--precision", "fp32", check=True)
    ours, training = (json.loads((d / "eval.json").read_text()) for d in (tmp_path, run))
    assert ours["num_samples"] == training["num_samples"]
    for head_ours, head_train in zip(
        [ours["ensemble"], *ours["branches"]], [training["ensemble"], *training["branches"]], strict=True
    ):
        assert head_ours == pytest.approx(head_train, abs=1e-6)


def test_training_curves_plot_from_a_real_run(trained, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    run_tool("plot", "curves", str(trained("s3dg", 1)), "--out", str(png), check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def test_soak_memory_stays_flat_and_no_process_is_left(demo_data, tmp_path):
    """4000 steps of the tiny DBoF on two ranks, each with a training and an evaluation DataLoader worker (kept for
    the run's life, serving every nominal epoch of 250 steps and every evaluation), evaluation and checkpoints every
    500 steps: the resident memory of the whole job (launcher, ranks and their data workers) in the last quarter
    stays within 10% (+64 MiB) of what it was a fifth of the way in, and when the job ends no process it started is
    left. The series is written to rss.csv beside the run."""
    steps = 4000
    recipe = _recipe(
        "dbof", demo_data, zero=2, steps=steps, eval_every=500, checkpoint_every=500, log_every=20, epochs=10_000
    )
    recipe["data"].update(num_workers=1, samples_per_epoch=2000)
    proc = launch(recipe, tmp_path / "soak", background=True)
    samples: list[tuple[float, int, int]] = []  # (progress in [0, 1], total RSS in KiB, processes)
    seen: set[int] = set()
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        # the ranks and their forked data workers (same command line); not a compiler DeepSpeed may start at first
        procs = [p for p in descendants(proc.pid) if _alive(p) and b"video_ens.train" in _cmdline(p)]
        seen.update(procs)
        done = max(_losses(tmp_path / "soak"), default=0) if (tmp_path / "soak" / "metrics.jsonl").exists() else 0
        if len(procs) >= 2 and done:
            samples.append((done / steps, _rss_kib(proc.pid) + sum(_rss_kib(p) for p in procs), len(procs)))
        time.sleep(0.25)
    if proc.poll() is None:
        kill_job(proc)
        pytest.fail("soak run did not finish in 900 s")
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
    (tmp_path / "rss.csv").write_text(
        "progress,rss_kib,processes\n" + "".join(f"{a:.4f},{b},{c}\n" for a, b, c in samples)
    )
    # compare like with like: samples taken with the usual process count (evaluation workers start at the first
    # evaluation; a worker of an evaluation that fails mid-way would be replaced)
    full = collections.Counter(c for _, _, c in samples).most_common(1)[0][0]  # ranks + data workers, usually
    early = [rss for progress, rss, n in samples if 0.15 <= progress <= 0.3 and n == full]
    late = [rss for progress, rss, n in samples if progress >= 0.75 and n == full]
    assert early and late, f"too few memory samples: {len(samples)}"
    baseline, end = sorted(early)[len(early) // 2], max(late)
    assert end <= baseline * 1.10 + 64 * 1024, f"job RSS grew from {baseline} KiB to {end} KiB ({tmp_path / 'rss.csv'})"
    time.sleep(1.0)
    assert len(seen) >= 4 and not [p for p in seen if _alive(p)], "processes outlived the job"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""

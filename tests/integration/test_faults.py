"""Numerical faults on two gloo ranks: a non-finite loss on one rank is seen by every rank at once, the step is
skipped (the weights and BN statistics stay exactly as they were, despite momentum and weight decay) and logged, and the run stops after train.max_bad_steps in a row."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
from launching import run_command, torchrun

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    from pathlib import Path
    import torch
    from video_ens import dist, engine
    from video_ens.config import recipe_from_dict
    from video_ens.models import create_model
    from video_ens.objective import loss_for
    from video_ens.optim import create_optimizer
    from video_ens.trainer import Trainer

    run_dir, bad_steps, max_bad = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    recipe = recipe_from_dict({
        "model": {"name": "resnet_tiny_ens2", "options": {"image_size": 32}},
        "data": {"kind": "image", "train_shards": "unused", "val_shards": "unused", "crop_size": 32,
                 "short_side": [32, 36]},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "schedule": "constant"},
        "train": {"epochs": 1, "max_steps": 6, "global_batch_size": 8, "precision": "fp32", "device": "cpu",
                  "log_every": 1, "max_bad_steps": max_bad},
    })
    device = torch.device("cpu")
    engine.ensure_process_group(device)
    torch.manual_seed(0)
    model = create_model(recipe.model.name, **recipe.model.builder_kwargs())
    eng = engine.initialize(model, create_optimizer(model, recipe.optim, lr=0.05),
                            engine.deepspeed_config(recipe, world_size=dist.world_size(), device=device))

    class Stream:  # 4 images per rank per micro-batch; NaN pixels on rank 1 only, at the listed positions
        micro_batches_per_epoch = 100
        # a skipped sample on rank 1 only: rank 0's metrics log must still name it
        stats = {"bad": 1, "bad_by_reason": {"decode": 1},
                 "last_bad": [{"key": "clip_of_rank_1", "reason": "decode", "detail": "test"}]} if dist.rank() == 1 else {}
        def batches(self, epoch, start):
            for pos in range(start, self.micro_batches_per_epoch):
                g = torch.Generator().manual_seed(1000 * dist.rank() + pos)
                x = torch.randn(4, 3, 32, 32, generator=g)
                if dist.rank() == 1 and pos in bad_steps:
                    x[0, 0, 0, 0] = float("nan")
                yield {"inputs": x, "target": torch.randint(0, 10, (4,), generator=g), "ids": [str(pos)] * 4}

    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    trainer = Trainer(recipe=recipe, run_dir=run_dir, engine=eng, criterion=loss_for(recipe.objective, model),
                      train_data=Stream(), eval_data=None, device=device, metrics_task="single_label")
    # Which steps left every weight bit for bit as it was (momentum and weight decay move them on any real step).
    # weights and BN running statistics (the bad forward moves those too: the trainer must restore them)
    snap = lambda: torch.cat([t.detach().flatten().double().clone()
                              for t in [*eng.module.parameters(), *eng.module.buffers()]])
    prev = snap()
    unchanged = []
    def on_step_end(t):
        global prev
        cur = snap()
        if torch.equal(cur, prev):
            unchanged.append(t.step)
        prev = cur
    outcome = "finished"
    try:
        trainer.fit(save_fn=lambda t: None, on_step_end=on_step_end)
    except FloatingPointError as e:
        outcome = f"stopped: {e}"
    finite = all(torch.isfinite(t.float()).all().item() for t in [*eng.module.parameters(), *eng.module.buffers()])
    # One write of the whole line: print() writes the text and its newline apart, and with unbuffered output the
    # other rank's line once landed between the two (CI: '{"rank": 0, ...}{"rank": 1, ...}').
    sys.stdout.write(json.dumps({"rank": dist.rank(), "outcome": outcome, "finite": finite, "step": trainer.step,
                                 "unchanged_steps": unchanged, "final_unchanged": torch.equal(snap(), prev)}) + "\\n")
    sys.stdout.flush()
    trainer.log.close()
    dist.shutdown()
    """
)


def _run(tmp_path: Path, bad_steps: list[int], max_bad: int) -> tuple[list[dict], list[dict]]:
    script = tmp_path / "fault.py"
    script.write_text(SCRIPT)
    run_dir = tmp_path / "run"
    cmd = torchrun(str(script), str(run_dir), json.dumps(bad_steps), str(max_bad))
    out = run_command(cmd, timeout=600, check=True)
    results = sorted(
        (json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"rank"')), key=lambda r: r["rank"]
    )
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return results, log


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    results, log = _run(tmp_path, bad_steps=[2], max_bad=3)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["outcome"] == "finished" and r["finite"] and r["step"] == 6 for r in results)
    # the skipped update (micro-batch 2, the 3rd step) is the only one that left the weights untouched, on both ranks
    assert all(r["unchanged_steps"] == [3] for r in results)
    skips = [r for r in log if r["kind"] == "skip"]
    # rank 0 writes the log and its own loss was finite: the skip it records is rank 1's, seen through the vote
    assert [(s["step"], s["micro_batches"]) for s in skips] == [(3, 1)]  # micro-batch 2 is the 3rd update
    train = {r["step"]: r for r in log if r["kind"] == "train"}
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    bad = train[6]["bad_samples"]  # gathered from every rank, not only rank 0's stream
    assert bad["bad"] == 1 and bad["bad_by_reason"] == {"decode": 1}
    assert bad["last_bad"] == [{"key": "clip_of_rank_1", "reason": "decode", "detail": "test", "rank": 1}]
    assert all(math_finite(train[s]["loss"]) for s in train if s != 3)


def test_consecutive_non_finite_steps_stop_the_run(tmp_path):
    results, log = _run(tmp_path, bad_steps=[1, 2, 3, 4, 5], max_bad=2)
    assert all(r["outcome"].startswith("stopped: 2 steps in a row had a non-finite loss") for r in results)
    assert all(r["finite"] and r["step"] == 2 for r in results)
    # micro-batch 0 was good, 1 and 2 were not: the 2nd step and the 3rd (the one that stopped the run) left the
    # weights exactly as the 1st step did; weight decay (0.01) and momentum did not move them either
    assert all(r["unchanged_steps"] == [2] and r["final_unchanged"] for r in results)
    assert [s["step"] for s in log if s["kind"] == "skip"] == [2, 3]


def math_finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


ONE_RANK_FAILS = textwrap.dedent(
    """
    import torch
    from video_ens import dist, engine

    engine.ensure_process_group(torch.device("cpu"))
    try:
        if dist.rank() == 1:
            raise RuntimeError("rank 1 cannot go on: boom")
        torch.distributed.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that will never come
    finally:
        dist.shutdown()
    """
)


def test_an_error_on_one_rank_ends_the_job_at_once_and_is_shown(tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: the job must end in seconds, with rank 1's traceback in
    the output, not sit in the shutdown barrier until gloo's 30-minute timeout with the error unprinted."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS)
    t0 = time.monotonic()
    out = run_command(torchrun(str(script)), timeout=240)
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert "rank 1 cannot go on: boom" in out.stdout + out.stderr
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"


ONE_RANK_STALLS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from video_ens import dist, engine
    from video_ens.config import recipe_from_dict
    from video_ens.models import create_model
    from video_ens.objective import loss_for
    from video_ens.optim import create_optimizer
    from video_ens.trainer import Trainer

    recipe = recipe_from_dict({
        "model": {"name": "resnet_tiny_ens2", "options": {"image_size": 32}},
        "data": {"kind": "image", "train_shards": "unused", "val_shards": "unused", "crop_size": 32,
                 "short_side": [32, 36]},
        "optim": {"name": "sgd", "lr": 0.05, "schedule": "constant"},
        "train": {"max_steps": 6, "global_batch_size": 8, "precision": "fp32", "device": "cpu", "log_every": 1,
                  "collective_timeout_s": 8},
    })
    device = torch.device("cpu")
    engine.ensure_process_group(device, recipe.train.collective_timeout_s)
    torch.manual_seed(0)
    model = create_model(recipe.model.name, **recipe.model.builder_kwargs())
    eng = engine.initialize(model, create_optimizer(model, recipe.optim, lr=0.05),
                            engine.deepspeed_config(recipe, world_size=dist.world_size(), device=device))

    class Stream:  # rank 1 hangs before its third micro-batch, as on a hung file system
        micro_batches_per_epoch = 100
        stats = {}
        def batches(self, epoch, start):
            for pos in range(start, self.micro_batches_per_epoch):
                if dist.rank() == 1 and pos == 2:
                    time.sleep(3600)
                g = torch.Generator().manual_seed(pos)
                yield {"inputs": torch.randn(4, 3, 32, 32, generator=g),
                       "target": torch.randint(0, 10, (4,), generator=g), "ids": [str(pos)] * 4}

    run_dir = Path(sys.argv[1]) / "run"
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    try:
        Trainer(recipe=recipe, run_dir=run_dir, engine=eng,
                criterion=loss_for(recipe.objective, model), train_data=Stream(), eval_data=None, device=device,
                metrics_task="single_label").fit(save_fn=lambda t: None)
    finally:
        dist.shutdown()
    """
)


def test_a_stalled_rank_ends_the_job_within_the_collective_timeout(tmp_path):
    """Rank 1 hangs (sleeps) inside its data stream while rank 0 waits in the step's all-reduce, which DeepSpeed
    runs in a group of its own: with train.collective_timeout_s = 8 the job ends in a few minutes at most, with a
    message naming the setting (torch's default for such a group would have held it for 30 minutes)."""
    script = tmp_path / "one_rank_stalls.py"
    script.write_text(ONE_RANK_STALLS)
    t0 = time.monotonic()
    out = run_command(torchrun(str(script), str(tmp_path)), timeout=300)
    elapsed = time.monotonic() - t0
    assert out.returncode != 0
    assert "rank 0: a collective waited longer than train.collective_timeout_s = 8 s" in out.stderr, out.stderr[-3000:]
    # start-up, 8 s of waiting, then torchrun's 30 s grace for rank 1 (whose SIGTERM handler waits for its step)
    assert elapsed < 180, f"the job took {elapsed:.0f} s to end"

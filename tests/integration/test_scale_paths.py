"""The paper recipes' scale paths on gloo ranks with the tiny DBoF (the cheapest tiny model, ~6 s a launch on 2
cores): gradient accumulation across a kill, ZeRO-3 against ZeRO-1, and a 2-rank checkpoint resumed on 1 and 4
ranks. Launches are shared through module fixtures: one accumulation run is the reference of the kill test and the
source of every world-size resume; one ZeRO-1 and one ZeRO-3 run serve the ZeRO-3 test and the resharding test.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import torch
from launching import ROOT, kill_job, launch, run_command, torchrun
from tiny_runs import cpu_train, data_section, metrics

pytestmark = pytest.mark.integration

STEPS = 8
CHECKPOINT = 4  # the world-size resumes start here: epoch 1, one step into it (3 steps an epoch)


@pytest.fixture(scope="module")
def yt8m(demo_data) -> Path:
    return demo_data("yt8m", num_train=64, num_validate=24, shard_size=16)  # test_train.py's too


def _recipe(data: Path, *, zero: int = 1, steps: int = STEPS, optim: dict | None = None, **train) -> dict:
    """16 samples a step, micro-batches of 2: 4 per rank per step on 2 ranks, 8 on 1, 2 on 4. An epoch of 60 samples
    is 3 steps at every world size (60 // 16), so the warm-up and cosine schedule cover epoch boundaries, and 60 is
    not a multiple of 2 x 4 ranks, which is what made the schedule depend on the world size."""
    return {
        "description": f"test: tiny DBoF, ZeRO-{zero}",
        # 97 clusters: the cluster layer (1152 x 97 = 111,744 weights) is above ZeRO-3's 100,000-element persistence
        # threshold, so it is partitioned between forward passes like a large model's, and the 97 x 97 context gate
        # does not split evenly over 2 or 4 ranks (padded partitions)
        "model": {"name": "dbof_tiny_ens2", "options": {"cluster_size": 97}},
        "data": data_section("features", data, samples_per_epoch=60),
        "objective": {"structure": "codistillation", "weight": 2.0, "loss": "sigmoid_bce"},
        "optim": optim or {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "cosine", "warmup_epochs": 1},
        "train": cpu_train(
            max_steps=steps,
            global_batch_size=16,
            micro_batch_size=2,
            checkpoint_every=2,
            keep_checkpoints=10,
            seed=0,
        )
        | train,
        "deepspeed": {"zero_stage": zero},
        "eval": {"mode": "full", "max_frames": 32, "batch_size": 4},
    }


def _launch(recipe: dict, run_dir: Path, *, nproc: int = 2, background: bool = False):
    return launch(recipe, run_dir, nproc=nproc, background=background, check=True)


def _per_step(run_dir: Path, *fields: str) -> dict[int, tuple]:
    """{step: (field, ...)} of the train lines; a step logged twice (before a kill and after it) keeps the last."""
    return {r["step"]: tuple(r[f] for f in fields) for r in metrics(run_dir, "train")}


def _module_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full module state (weights and buffers) a ZeRO-1/2 checkpoint stores beside its optimizer partitions."""
    from video_ens.engine import safe_torch_load

    return safe_torch_load(str(checkpoint / "mp_rank_00_model_states.pt"), "cpu")["module"]


def _assert_same_tensors(got: dict[str, torch.Tensor], expect: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(expect), what
    differ = [k for k in expect if not torch.equal(got[k], expect[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:4]}"


# ------------------------------------------------------------------------------------- gradient accumulation


@pytest.fixture(scope="module")
def accum_run(yt8m, tmp_path_factory) -> Path:
    """ZeRO-1, 4 micro-batches per rank per step, 8 steps with a checkpoint every 2, uninterrupted."""
    run = tmp_path_factory.mktemp("accum") / "run"
    _launch(_recipe(yt8m), run)
    return run


def test_gradient_accumulation_kill_and_resume_gives_the_uninterrupted_losses(yt8m, accum_run, tmp_path):
    """4 micro-batches per step: the whole job SIGKILLed after step 3 and launched again resumes at the micro-batch
    its newest complete checkpoint recorded and logs exactly the uninterrupted losses and learning rates."""
    recipe = _recipe(yt8m)
    run = tmp_path / "killed"
    proc = _launch(recipe, run, background=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").exists() and len(metrics(run, "train")) >= 3):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stdout.read()[-3000:]}")
            assert time.monotonic() < deadline, "step 3 not reached in 300 s"
            time.sleep(0.05)  # a step of this model takes ~0.1 s: poll faster than that
        kill_job(proc)
    finally:
        proc.wait(timeout=60)
    from video_ens.engine import latest_checkpoint

    resume_from = latest_checkpoint(run / "checkpoints")
    assert resume_from is not None and resume_from[0] < STEPS, "the kill came too late to test anything"
    lines_before = len(metrics(run, "train"))

    _launch(recipe, run)
    expect = _per_step(accum_run, "loss", "lr")
    assert sorted(expect) == list(range(1, STEPS + 1))
    assert _per_step(run, "loss", "lr") == expect  # exactly: same ranks, same micro-batches, same sums
    assert len(metrics(run, "train")) - lines_before == STEPS - resume_from[0]  # nothing trained twice, nothing skipped
    assert [r["step"] for r in metrics(run, "resume")] == [resume_from[0]]


# ---------------------------------------------------------------------------------------------------- ZeRO-3


def test_no_gradient_clipping_unless_the_recipe_asks():
    """DeepSpeed 0.19 clips the global gradient norm to 1.0 when its config has no gradient_clipping, which silently
    clipped every run whose recipe says optim.grad_clip null ("no clipping"): the engine states 0.0, DeepSpeed's
    "off". (The clipping also broke ZeRO-3 against ZeRO-1 below: the two compute the norm in different orders.)"""
    from video_ens.config import recipe_from_dict
    from video_ens.engine import deepspeed_config

    def clipping(**optim) -> float:
        recipe = _recipe(Path("unused"))
        recipe["optim"].update(optim)
        return deepspeed_config(recipe_from_dict(recipe), world_size=2, device=torch.device("cpu"))["gradient_clipping"]

    assert (clipping(), clipping(grad_clip=0.5)) == (0.0, 0.5)


ZERO_STEPS = 8


@pytest.fixture(scope="module")
def zero_runs(yt8m, tmp_path_factory) -> dict[str, Path]:
    """One micro-batch of 8 per rank per step (no accumulation), constant learning rate: ZeRO-1 for 8 steps, and
    ZeRO-3 for 4 steps (ending with its export) then launched again with max_steps 8, which resumes it from its
    step-4 checkpoint. The step-4 export is kept as model_step4.safetensors."""
    base = tmp_path_factory.mktemp("zero")
    optim = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "constant"}
    layout = {"micro_batch_size": None, "grad_accum_steps": 1}
    runs = {"zero1": base / "zero1", "zero3": base / "zero3"}
    _launch(_recipe(yt8m, zero=1, steps=ZERO_STEPS, optim=optim, **layout), runs["zero1"])
    _launch(_recipe(yt8m, zero=3, steps=4, optim=optim, **layout), runs["zero3"])
    shutil.copy(runs["zero3"] / "model.safetensors", runs["zero3"] / "model_step4.safetensors")
    _launch(_recipe(yt8m, zero=3, steps=ZERO_STEPS, optim=optim, **layout), runs["zero3"])
    return runs


def test_zero3_trains_resumes_and_exports_exactly_as_zero1(zero_runs):
    """ZeRO-3 (parameters partitioned over the ranks) gives ZeRO-1's per-step losses and exported weights bit for
    bit, before and after a resume. Without accumulation both reduce the same per-rank gradients once per step
    (two ranks: a + b is exact in either order). With accumulation ZeRO-1 differs from ZeRO-2 and -3 (which agree
    bit for bit, measured): ZeRO-2/3 reduce every micro-batch across the ranks where ZeRO-1 sums the micro-batches
    first, another float summation order (1-ulp weight differences after the first step with the accumulation
    recipe above, grown to 3e-3 in the loss by step 6 through BatchNorm on micro-batches of 2)."""
    from safetensors.torch import load_file

    one, three = zero_runs["zero1"], zero_runs["zero3"]
    losses = _per_step(one, "loss", "lr")
    assert sorted(losses) == list(range(1, ZERO_STEPS + 1))
    assert _per_step(three, "loss", "lr") == losses
    assert [(r["step"], r["changed"]) for r in metrics(three, "resume")] == [(4, [])]
    # ZeRO-3's export comes from the partitions in its checkpoint (zero_to_fp32), ZeRO-1's from the module
    _assert_same_tensors(
        load_file(str(three / "model_step4.safetensors")),
        _module_weights(one / "checkpoints" / "step_000000004"),
        "ZeRO-3 export at step 4",
    )
    _assert_same_tensors(
        load_file(str(three / "model.safetensors")),
        load_file(str(one / "model.safetensors")),
        "ZeRO-3 export at step 8",
    )
    assert (
        json.loads((three / "eval.json").read_text())["ensemble"]
        == json.loads((one / "eval.json").read_text())["ensemble"]
    )


# ------------------------------------------------------------------------------- another world size


@pytest.mark.parametrize("world", [1, 4])
def test_a_two_rank_checkpoint_resumes_on_another_world_size(world, yt8m, accum_run, tmp_path):
    """The step-4 checkpoint of the 2-rank accumulation run, launched on 1 rank (8 micro-batches of 2 a step) and on
    4 (2 of 2): the global batch, the step, the epoch position and the learning rate of every later step are those
    of the uninterrupted run; the losses are not, because which samples a rank reads, in which order and with
    which augmentation draws depends on the number of ranks (the README says so)."""
    run = tmp_path / "run"
    shutil.copytree(accum_run / "checkpoints" / "step_000000004", run / "checkpoints" / "step_000000004")
    _launch(_recipe(yt8m), run, nproc=world)
    (mark,) = metrics(run, "resume")
    assert (mark["step"], mark["changed"]) == (CHECKPOINT, [f"world size: 2 -> {world}"])
    assert mark["batch"] == {"world_size": world, "micro_batch_size": 2, "grad_accum_steps": 16 // (2 * world)}
    resumed, expect = _per_step(run, "lr", "epoch", "loss"), _per_step(accum_run, "lr", "epoch", "loss")
    assert sorted(resumed) == list(range(CHECKPOINT + 1, STEPS + 1))
    assert {s: v[:2] for s, v in resumed.items()} == {s: expect[s][:2] for s in resumed}  # lr and epoch: exact
    assert all(resumed[s][2] != expect[s][2] for s in resumed), "the data order changes with the world size"


# A checkpoint loaded on `world` ranks and saved again, by the library calls train.py makes, with the module's
# weights as the forward pass sees them written beside it.
RESHARD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters
    from safetensors.torch import save_file
    from video_ens import dist, engine
    from video_ens.config import load_recipe
    from video_ens.optim import create_optimizer, peak_lr
    from video_ens.train import build_model

    out = Path(sys.argv[1])
    engine.ensure_process_group(torch.device("cpu"))
    for name, recipe_path, checkpoint in zip(*[iter(sys.argv[2:])] * 3):
        recipe = load_recipe(recipe_path)
        torch.manual_seed(123)  # initial weights unlike the checkpoint's: the load must replace every one
        model = build_model(recipe)
        optimizer = create_optimizer(model, recipe.optim, lr=peak_lr(recipe.optim, recipe.train.global_batch_size))
        config = engine.deepspeed_config(recipe, world_size=dist.world_size(), device=torch.device("cpu"))
        eng = engine.initialize(model, optimizer, config)
        step = engine.load_checkpoint(eng, checkpoint)["step"]
        engine.save_checkpoint(eng, out / name, step, {"step": step}, keep=1)
        params = list(eng.module.parameters())
        with GatheredParameters(params, enabled=eng.zero_optimization_stage() == 3):
            if dist.is_main():
                save_file({k: v.detach().clone().contiguous() for k, v in eng.module.state_dict().items()},
                          str(out / f"{name}_module.safetensors"))
        torch.distributed.barrier()
    dist.shutdown(failed=False, exit_code=0)
    """
)


@pytest.mark.parametrize("world", [1, 4])
def test_resharded_state_is_the_saved_state_bit_for_bit(world, accum_run, zero_runs, tmp_path):
    """What a resume at another world size starts from: the 2-rank ZeRO-1 and ZeRO-3 checkpoints loaded on `world`
    ranks and saved again hold every parameter's fp32 master weight and momentum exactly as saved, and the module
    (what the forward pass reads) holds the same weights and BatchNorm statistics."""
    from safetensors.torch import load_file

    from video_ens.engine import full_parameter_states, latest_checkpoint

    sources = {
        "zero1": (accum_run, accum_run / "checkpoints" / "step_000000004"),
        "zero3": (zero_runs["zero3"], zero_runs["zero3"] / "checkpoints" / "step_000000004"),
    }
    script = tmp_path / "reshard.py"
    script.write_text(RESHARD)
    args = [str(a) for name, (run, ckpt) in sources.items() for a in (name, run / "recipe.json", ckpt)]
    out = run_command(torchrun(str(script), str(tmp_path), *args, nproc=world), cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "written by 2 rank(s)" in out.stdout + out.stderr
    for name, (_, ckpt) in sources.items():
        saved, model = full_parameter_states(ckpt)[:2]
        (step, again_path) = latest_checkpoint(tmp_path / name)
        again = full_parameter_states(again_path).full
        assert step == CHECKPOINT and sorted(saved) == sorted(again) == ["fp32", "momentum_buffer"]
        for key in saved:
            _assert_same_tensors(again[key], saved[key], f"{name} {key} after a resume on {world} rank(s)")
        buffers = {k: v for k, v in model["module"].items() if k not in saved["fp32"]}
        _assert_same_tensors(
            load_file(str(tmp_path / f"{name}_module.safetensors")),
            {**saved["fp32"], **buffers},
            f"{name} module on {world} rank(s)",
        )

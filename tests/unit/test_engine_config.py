"""DeepSpeed config derivation and checkpoint bookkeeping (no DeepSpeed process needed)."""

import pytest
import torch

from video_ens import engine
from video_ens.config import RecipeError, recipe_from_dict

BASE = {"model": {"name": "s3dg_tiny"}, "data": {"train_shards": "data/t", "val_shards": "data/v"}}


def _recipe(**sections):
    raw = {**BASE, **sections}
    return recipe_from_dict(raw)


@pytest.mark.parametrize(
    "train, world, expect",
    [
        ({"global_batch_size": 2048, "micro_batch_size": 8}, 64, (8, 4)),
        ({"global_batch_size": 2048, "micro_batch_size": 8}, 128, (8, 2)),
        ({"global_batch_size": 32}, 2, (16, 1)),
        ({"global_batch_size": 32, "grad_accum_steps": 2}, 2, (8, 2)),
    ],
)
def test_batch_fields_are_derived_once(train, world, expect):
    cfg = engine.deepspeed_config(_recipe(train=train), world_size=world, device=torch.device("cpu"))
    mb, acc = expect
    assert cfg["train_micro_batch_size_per_gpu"] == mb
    assert cfg["gradient_accumulation_steps"] == acc
    assert cfg["train_batch_size"] == mb * acc * world == train["global_batch_size"]


def test_inconsistent_batch_fields_are_rejected():
    r = _recipe(train={"global_batch_size": 2048, "micro_batch_size": 8, "grad_accum_steps": 4})
    with pytest.raises(RecipeError, match="x world size 32 = 1024, not train.global_batch_size 2048"):
        engine.deepspeed_config(r, world_size=32, device=torch.device("cpu"))
    with pytest.raises(RecipeError, match="not divisible by the world size 3"):
        engine.deepspeed_config(_recipe(train={"global_batch_size": 32}), world_size=3, device=torch.device("cpu"))


def test_precision_blocks():
    cpu = torch.device("cpu")
    bf16 = engine.deepspeed_config(_recipe(train={"precision": "bf16"}), world_size=1, device=cpu)
    # torch_autocast keeps BatchNorm parameters in fp32; the bf16 block would cast them (ecosystem.md)
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in bf16 and "fp16" not in bf16
    fp32 = engine.deepspeed_config(_recipe(train={"precision": "fp32"}), world_size=1, device=cpu)
    assert "torch_autocast" not in fp32 and "fp16" not in fp32
    # fp16 autocasts too (DeepSpeed adds a dynamic loss scale); its "fp16" block would cast BatchNorm to fp16 and
    # expect fp16 inputs
    for device in (cpu, torch.device("cuda")):
        fp16 = engine.deepspeed_config(_recipe(train={"precision": "fp16"}), world_size=1, device=device)
        assert fp16["torch_autocast"] == {"enabled": True, "dtype": "float16"}
        assert "fp16" not in fp16 and "bf16" not in fp16


def test_zero_clipping_and_offload():
    r = _recipe(deepspeed={"zero_stage": 2, "offload_optimizer": True}, optim={"grad_clip": 1.0})
    cfg = engine.deepspeed_config(r, world_size=1, device=torch.device("cpu"))
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert cfg["gradient_clipping"] == 1.0


def test_only_complete_checkpoints_are_listed(tmp_path):
    for name in ("step_000000010", "step_000000020", "step_000000030.partial", "junk", "step_12"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_000000040").write_text("a file, not a checkpoint")
    assert [s for s, _ in engine.list_checkpoints(tmp_path)] == [10, 20]
    assert engine.latest_checkpoint(tmp_path)[0] == 20
    assert engine.latest_checkpoint(tmp_path / "missing") is None
    removed = engine.remove_partial_checkpoints(tmp_path)
    assert [p.name for p in removed] == ["step_000000030.partial"]
    assert not (tmp_path / "step_000000030.partial").exists()


def test_loading_refuses_an_unfinished_checkpoint(tmp_path):
    (tmp_path / "step_000000010").mkdir()  # no complete.json
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        engine.load_checkpoint(object(), tmp_path / "step_000000010")


class _Payload:
    """Unpickling this would call os.getpid (harmless here; a real attack would call something worse)."""

    def __reduce__(self):
        import os

        return (os.getpid, ())


def test_checkpoint_files_are_read_without_unpickling_arbitrary_objects(tmp_path):
    pytest.importorskip("deepspeed")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(3.0), "step": 7, "names": ["a", "b"]}, good)
    loaded = engine.safe_torch_load(str(good))
    assert loaded["step"] == 7 and torch.equal(loaded["w"], torch.arange(3.0))
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.zeros(1), "x": _Payload()}, bad)
    with pytest.raises(RuntimeError, match="bad.pt: refused to load"):
        engine.safe_torch_load(str(bad))


def test_torch_load_is_safe_inside_the_block_for_code_that_asks_for_unsafe_loading(tmp_path):
    """DeepSpeed's zero_to_fp32 (the ZeRO-3 export) calls torch.load(..., weights_only=False) itself."""
    pytest.importorskip("deepspeed")
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.arange(3.0)}, good)
    torch.save({"x": _Payload()}, bad)
    original = torch.load
    with engine.torch_load_is_safe():
        assert torch.equal(torch.load(good, map_location="cpu", weights_only=False, mmap=True)["w"], torch.arange(3.0))
        with pytest.raises(RuntimeError, match="bad.pt: refused to load"):
            torch.load(bad, weights_only=False)
    assert torch.load is original


# ------------------------------------------------------------------------------------------- model construction


@pytest.mark.parametrize(
    "model, paths, reason",
    [
        # (a bad fork or kernels is refused by the recipe check itself: tests/unit/test_config.py)
        (
            {"name": "resnet_tiny_ens2", "options": {"branch_widths": [4]}},
            "model.options.branch_widths",
            "branch_widths (one per block above fork='block2') must be 2 positive integers",
        ),
        (
            {"name": "resnet_tiny_ens2", "width_ratio": 0.5, "options": {"branch_widths": [4, 8]}},
            "model.width_ratio, model.options.branch_widths",
            "give branch_widths or width_ratio, not both",
        ),
    ],
)
def test_a_model_the_builder_refuses_is_a_recipe_error_naming_the_fields(model, paths, reason):
    from video_ens.train import build_model

    data = {"kind": "image", "train_shards": "data/t", "val_shards": "data/v"} if "resnet" in model["name"] else None
    r = _recipe(model=model, **({"data": data} if data else {}))  # passes the recipe check: only building can tell
    with pytest.raises(RecipeError) as e:
        build_model(r, device="meta", source="r.json")
    assert str(e.value).startswith(f"r.json: {paths}: model {model['name']} cannot be built: {reason}")
    assert build_model(_recipe(), device="meta").num_branches == 1


def test_train_refuses_an_unbuildable_model_before_any_process_group(capsys):
    from video_ens import dist, train

    rc = train.main(["recipes/demo_imagenet_resnet_mu3.json", "--dry-run", "--set", "model.fork=block9"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: recipes/demo_imagenet_resnet_mu3.json (with --set model.fork=block9): model.fork: " in err
    assert "Traceback" not in err
    assert not dist.is_initialized()

"""model.init_from on tiny models: what is loaded from where (by value and by the function the model computes), the
strict errors with the tensors they name, exclusion, the report per part, and the recipe fields."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from video_ens.config import RecipeError, default_run_dir, recipe_from_dict, recipe_to_dict, resume_differences
from video_ens.models import create_model
from video_ens.weights import check_init, init_model, save_weights


def _build(name: str, seed: int, **kw):
    torch.manual_seed(seed)
    return create_model(name, **kw)


def _trained_like(model, seed: int):
    """Distinct values in every tensor, BatchNorm statistics included (a fresh build has 0/1 statistics everywhere,
    which would hide a BN loaded from the wrong place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


def _save(model, path):
    save_weights(path, model.state_dict(), metadata={"model": "test"})
    return path


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """One-branch tiny models of each family with "trained" values, saved as a run folder's model.safetensors."""
    root = tmp_path_factory.mktemp("baselines")
    out = {}
    for name, kw in (("resnet_tiny", {"image_size": 32}), ("s3dg_tiny", {}), ("dbof_tiny", {})):
        model = _trained_like(_build(name, 0, **kw), 1)
        (root / name).mkdir()
        _save(model, root / name / "model.safetensors")
        out[name] = (model, root / name)
    return out


def _inputs(family: str):
    torch.manual_seed(5)
    if family == "resnet_tiny":
        return (torch.randn(3, 3, 32, 32),), {}
    if family == "s3dg_tiny":
        return (torch.randn(2, 3, 8, 32, 32),), {}
    return (torch.randn(3, 6, 1152),), {"lengths": torch.tensor([6, 4, 1])}


def test_a_run_folder_and_its_weights_file_load_every_tensor(baselines):
    source, run = baselines["resnet_tiny"]
    for where in (run, run / "model.safetensors"):
        model = _build("resnet_tiny", 7, image_size=32)
        report = init_model(model, where)
        for name, value in model.state_dict().items():
            assert torch.equal(value, source.state_dict()[name]), name  # BN statistics and counters included
        assert report.source.path == run / "model.safetensors"
        expect = {
            "base": sum(k.startswith("base.") for k in model.state_dict()),
            "branch 0": sum(k.startswith("branches.0.") for k in model.state_dict()),
        }
        assert {p: c["loaded"] for p, c in report.parts.items()} == expect
        assert all(c["new"] == 0 and c["excluded"] == 0 for c in report.parts.values())
        assert report.warnings() == []


@pytest.mark.parametrize("family", ["resnet_tiny", "s3dg_tiny", "dbof_tiny"])
def test_a_baseline_initialises_each_branch_of_a_two_branch_model(baselines, family):
    """Base from the baseline's lower layers, each branch from its upper layers: every branch then predicts what the
    baseline predicts, so the ensemble is the baseline's output (DBoF has a context gate of the same name in the
    base and in the branch: each must come from its own part, else the outputs differ)."""
    source, run = baselines[family]
    kw = {"image_size": 32} if family == "resnet_tiny" else {}
    model = _build(family, 3, num_branches=2, width_ratio=1.0, **kw).eval()
    report = init_model(model, run)
    args, inputs = _inputs(family)
    with torch.no_grad():
        want, got = source(*args, **inputs), model(*args, **inputs)
    for b in range(2):
        torch.testing.assert_close(got.branches[b], want.branches[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.ensemble, want.ensemble, rtol=1e-5, atol=1e-6)
    assert report.branch_sources == {"base": ["base"], "branch 0": ["branch 0"], "branch 1": ["branch 0"]}
    assert report.identical_branches == [[0, 1]]
    (warning,) = report.warnings()
    assert "branches 0, 1 start from the same weights" in warning


def test_the_fork_may_sit_elsewhere_in_the_source(baselines):
    source, run = baselines["resnet_tiny"]  # forks after block2
    model = _build("resnet_tiny", 3, num_branches=2, width_ratio=1.0, fork="block1", image_size=32).eval()
    report = init_model(model, run)  # block2 is in this model's branches and in the source's base
    assert report.branch_sources["branch 1"] == ["base", "branch 0"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).ensemble, source(x).ensemble, rtol=1e-5, atol=1e-6)
    # the other way round: the source's block2 exists once per branch, so no single tensor fills a shared block2
    two = _trained_like(_build("resnet_tiny", 4, num_branches=2, width_ratio=1.0, fork="block1", image_size=32), 2)
    path = _save(two, run.parent / "forked_low.safetensors")
    with pytest.raises(
        RecipeError,
        match=r"base\.block2\.unit1\.conv1\.weight \(the source has it in each of its 2 "
        r"branches, none shared\)",
    ):
        init_model(_build("resnet_tiny", 5, image_size=32), path)


def test_narrower_branches_are_refused_and_excluding_them_keeps_their_fresh_weights(baselines):
    source, run = baselines["resnet_tiny"]
    model = _build("resnet_tiny_ens2", 3, image_size=32)
    before = _state(model)
    with pytest.raises(RecipeError) as e:
        init_model(model, run)
    message = str(e.value)
    narrower = [
        k
        for k in model.state_dict()
        if k.startswith("branches.")
        and not k.endswith("num_batches_tracked")
        and model.state_dict()[k].shape != source.state_dict()["branches.0." + k.split(".", 2)[2]].shape
    ]
    assert f"{len(narrower)} tensor(s) of another shape" in message
    assert (
        "branches.0.block3.unit1.conv1.weight (22, 64, 1, 1) <- branches.0.block3.unit1.conv1.weight (32, 64, 1, 1)"
        in message
        and "exclude 'branches.*'" in message
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a refused init changed the model"
    report = init_model(model, run, exclude=["branches.*"])
    for name, value in model.state_dict().items():
        want = source.state_dict()[name] if name.startswith("base.") else before[name]
        assert torch.equal(value, want), name
    branch = report.parts["branch 1"]
    # every one of them had a source tensor (of the baseline's width), which the exclusion kept out
    assert branch["loaded"] == 0 and branch["new"] == branch["excluded"] == branch["tensors"]
    assert report.identical_branches == []


def test_a_new_class_count_is_refused_naming_the_classifier_unless_excluded(baselines):
    source, run = baselines["s3dg_tiny"]  # 8 classes
    model = _build("s3dg_tiny", 3, num_classes=5)
    fresh = _state(model)
    with pytest.raises(RecipeError) as e:
        init_model(model, run)
    message = str(e.value)
    assert "2 tensor(s) of another shape" in message and "the source does not hold" not in message
    assert (
        "branches.0.Logits.conv.weight (5, 128, 1, 1, 1) <- branches.0.Logits.conv.weight (8, 128, 1, 1, 1)" in message
    )
    assert "branches.0.Logits.conv.bias (5,) <- branches.0.Logits.conv.bias (8,)" in message
    assert '["branches.*.Logits.conv.*"]' in message  # the exclusion that fixes it
    report = init_model(model, run, exclude=["branches.*.Logits.conv.*"])
    for name, value in model.state_dict().items():
        want = fresh[name] if ".Logits.conv." in name else source.state_dict()[name]
        assert torch.equal(value, want), name
    assert report.parts["branch 0"]["excluded"] == 2 and report.parts["branch 0"]["new"] == 2
    assert report.parts["base"]["new"] == 0
    record = json.loads(json.dumps(report.record()))  # what metrics.jsonl gets
    assert record["exclude"] == ["branches.*.Logits.conv.*"] and record["parts"] == report.parts


def test_missing_tensors_unused_ones_and_patterns_that_match_nothing(baselines, tmp_path):
    source, run = baselines["dbof_tiny"]
    state = dict(source.state_dict())
    del state["branches.0.moe.experts.bias"]
    save_weights(tmp_path / "partial.safetensors", state)
    with pytest.raises(RecipeError, match=r"1 tensor\(s\) the source does not hold: branches\.0\.moe\.experts\.bias"):
        init_model(_build("dbof_tiny", 3), tmp_path / "partial.safetensors")
    with pytest.raises(RecipeError, match=r"model\.init_exclude\[1\]: 'branch\.\*' matches no tensor"):
        init_model(_build("dbof_tiny", 3), run, exclude=["branches.*.moe.*", "branch.*"])
    # a two-branch source into one branch: branch 1 has no place, which is reported, not refused
    two = _save(_trained_like(_build("dbof_tiny", 4, num_branches=2, width_ratio=1.0), 3), tmp_path / "two.safetensors")
    report = init_model(_build("dbof_tiny", 3), two)
    assert len(report.unused) == sum(k.startswith("branches.1.") for k in load_file(str(two))) and report.warnings()
    # a two-branch source cannot fill a third branch; in particular the branch's context gate is not taken from the
    # base's gate of the same name and shape (64 x 64 in dbof_tiny): that name is not the same layer in both parts
    with pytest.raises(RecipeError, match=r"the source has 2 branch\(es\), not branch 2") as e:
        init_model(_build("dbof_tiny", 3, num_branches=3, width_ratio=1.0), two)
    assert "branches.2.context_gate.linear.weight (the source has 2 branch(es), not branch 2)" in str(e.value)


def test_sources_that_are_not_weights_are_named(tmp_path):
    model = _build("resnet_tiny", 0, image_size=32)
    torch.save(model.state_dict(), tmp_path / "model.safetensors")  # a pickle under the right name
    with pytest.raises(RecipeError, match=r"model\.safetensors is not a safetensors file .*tools/import_weights\.py"):
        init_model(model, tmp_path / "model.safetensors")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(RecipeError, match=r"empty_run is a folder with neither a model\.safetensors nor a complete"):
        init_model(model, tmp_path / "empty_run")
    (tmp_path / "run" / "checkpoints" / "step_000000004.partial").mkdir(parents=True)
    with pytest.raises(RecipeError, match=r"step_000000004\.partial is not a complete checkpoint"):
        init_model(model, tmp_path / "run" / "checkpoints" / "step_000000004.partial")
    with pytest.raises(RecipeError, match=r"model\.init_from: .*nowhere: no such file or folder"):
        init_model(model, tmp_path / "nowhere")


def test_the_launch_check_plans_from_the_header_on_a_meta_model(baselines):
    source, run = baselines["s3dg_tiny"]
    with torch.device("meta"):
        meta = create_model("s3dg_tiny", num_branches=2, width_ratio=1.0)
    planned = check_init(meta, run, exclude=["branches.*.Logits.conv.*"])
    real = init_model(
        _build("s3dg_tiny", 3, num_branches=2, width_ratio=1.0), run, exclude=["branches.*.Logits.conv.*"]
    )
    assert planned.parts == real.parts and planned.branch_sources == real.branch_sources
    with torch.device("meta"), pytest.raises(RecipeError, match="of another shape"):
        check_init(create_model("s3dg_tiny_ens2"), run)


def _raw(**model):
    return {
        "model": {"name": "resnet_tiny", **model},
        "data": {"kind": "image", "train_shards": "data/train", "val_shards": "data/val"},
        "train": {"global_batch_size": 8},
    }


def test_recipe_fields_and_what_a_resume_may_change(tmp_path):
    recipe = recipe_from_dict(_raw(init_from="runs/base", init_exclude=["branches.*.fc.*"]))
    assert recipe.model.init_from == "runs/base" and recipe.model.init_exclude == ["branches.*.fc.*"]
    with pytest.raises(RecipeError, match=r"model\.init_exclude: needs model\.init_from"):
        recipe_from_dict(_raw(init_exclude=["branches.*"]))
    with pytest.raises(RecipeError, match=r"model\.init_exclude\[0\]: is empty"):
        recipe_from_dict(_raw(init_from="x", init_exclude=[""]))
    # the starting weights define the run: another init_from is another run, not a resume of this one
    saved = recipe_to_dict(recipe_from_dict(_raw()))
    assert resume_differences(saved, recipe) == [
        'model.init_exclude: [] -> ["branches.*.fc.*"]',
        'model.init_from: null -> "runs/base"',
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_raw()))
    plain = default_run_dir(path)
    assert default_run_dir(path, ["model.init_from=runs/a"]) != default_run_dir(path, ["model.init_from=runs/b"])
    assert default_run_dir(path, ["model.init_from=runs/a"]) != plain

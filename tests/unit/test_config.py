"""Strict recipe loading: errors name the JSON path and the fix; overrides pass the same checks; round trips."""

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from video_ens.config import (
    SECTIONS,
    Recipe,
    RecipeError,
    TrainConfig,
    apply_overrides,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"model": {"name": "s3dg_tiny"}, "data": {"train_shards": "data/t", "val_shards": "data/v"}}


def _write(tmp_path, raw):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(raw))
    return p


def _error(raw, overrides=()):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(apply_overrides(raw, list(overrides)), source="t.json")
    return str(e.value)


def test_minimal_recipe_fills_defaults():
    r = recipe_from_dict(MINIMAL)
    assert r.model.name == "s3dg_tiny"
    assert r.objective.structure == "codistillation" and r.objective.weight == 2.0
    assert r.train.precision == "bf16"
    assert r.data.short_side == (256, 320)


@pytest.mark.parametrize(
    "patch, expect",
    [
        ({"optim": {"lrr": 0.1}}, "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ({"modle": {}}, "unknown key 'modle'; did you mean 'model'?"),
        ({"optim": {"lr": "fast"}}, 'optim.lr: expected a number, got "fast"'),
        ({"optim": {"lr": -1}}, "optim.lr: must be a positive number"),
        ({"train": {"global_batch_size": 2.5}}, "train.global_batch_size: expected an integer"),
        ({"train": {"global_batch_size": True}}, "train.global_batch_size: expected an integer"),
        ({"train": {"flip": 1}}, "unknown key 'train.flip'"),
        ({"data": {"flip": 1}}, "data.flip: expected true or false"),
        ({"objective": {"structure": "codistilation"}}, 'did you mean "codistillation"?'),
        ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage: must be 0, 1, 2 or 3"),
        ({"data": {"short_side": [300, 256]}}, "data.short_side: must be [min, max]"),
        ({"data": {"short_side": [128, 160]}}, "smaller than crop_size 224"),
        ({"model": {"name": "", "num_branches": 2}}, "model.name: is required"),
        ({"model": {"name": "x", "num_branches": 0}}, "model.num_branches: must be >= 1"),
        ({"train": {"global_batch_size": 8, "micro_batch_size": 3}}, "does not divide global_batch_size 8"),
        ({"eval": {"num_crops": 2}}, "eval.num_crops: must be 1 or 3"),
        ({"data": {"train_shards": ""}}, "data.train_shards: is required"),
        ({"data": {"kind": "features"}}, "objective.loss: softmax_ce is single-label"),
        ({"optim": {"name": "adam", "nesterov": True}}, "optim.nesterov"),
    ],
)
def test_errors_name_the_path_and_the_fix(patch, expect):
    raw = json.loads(json.dumps(MINIMAL))
    for section, values in patch.items():
        raw[section] = {**raw.get(section, {}), **values}
    msg = _error(raw)
    assert msg.startswith("t.json: ")
    assert expect in msg


def test_missing_model_section_names_model_name():
    assert "model.name: is required" in _error({"data": MINIMAL["data"]})


def test_overrides_go_through_the_same_checks():
    r = recipe_from_dict(
        apply_overrides(
            MINIMAL,
            [
                "optim.lr=0.5",
                "objective.structure=ensembling",
                "objective.weight=-1.5",
                "data.short_side=[240, 300]",
                "train.max_steps=null",
                "model.options.widths_scale=0.25",
            ],
        )
    )
    assert r.optim.lr == 0.5
    assert r.objective.structure == "ensembling" and r.objective.weight == -1.5
    assert r.data.short_side == (240, 300)
    assert r.model.options == {"widths_scale": 0.25}
    assert "unknown key 'optim.lrr'" in _error(MINIMAL, ["optim.lrr=0.1"])
    assert "optim.lr: expected a number" in _error(MINIMAL, ["optim.lr=abc"])
    with pytest.raises(RecipeError, match="expected key=value"):
        apply_overrides(MINIMAL, ["optim.lr"])
    with pytest.raises(RecipeError, match="is a value, not a section"):
        apply_overrides(MINIMAL, ["model.name.x=1"])


def test_overrides_do_not_modify_the_input():
    raw = json.loads(json.dumps(MINIMAL))
    apply_overrides(raw, ["optim.lr=0.5"])
    assert raw == MINIMAL


def test_resolved_recipe_round_trips(tmp_path):
    src = _write(tmp_path, {**MINIMAL, "description": "d", "optim": {"lr": 0.2, "betas": [0.8, 0.9]}})
    r = load_recipe(src, ["train.global_batch_size=16"])
    out = tmp_path / "resolved.json"
    dump_recipe(r, out)
    again = load_recipe(out)
    assert again == r
    assert recipe_to_dict(again) == json.loads(out.read_text())
    assert set(json.loads(out.read_text())) == {"description", *SECTIONS}


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"name": "x",}}')
    with pytest.raises(RecipeError, match="bad.json: not valid JSON at line 1"):
        load_recipe(bad)


@pytest.mark.parametrize(
    "world, kw, expect",
    [
        (1, {}, (32, 1)),
        (4, {}, (8, 1)),
        (4, {"micro_batch_size": 2}, (2, 4)),
        (2, {"grad_accum_steps": 4}, (4, 4)),
        (2, {"micro_batch_size": 4, "grad_accum_steps": 4}, (4, 4)),
    ],
)
def test_batch_layout(world, kw, expect):
    assert TrainConfig(global_batch_size=32, **kw).batch_layout(world) == expect


@pytest.mark.parametrize(
    "world, kw, match",
    [
        (3, {}, "not divisible by the world size 3"),
        (4, {"micro_batch_size": 16}, "micro_batch_size 16 does not divide the per-rank batch 8"),
        (4, {"micro_batch_size": 4, "grad_accum_steps": 4}, "= 64, not train.global_batch_size 32"),
    ],
)
def test_batch_layout_inconsistent(world, kw, match):
    with pytest.raises(RecipeError, match=match):
        TrainConfig(global_batch_size=32, **kw).batch_layout(world)


def test_every_field_has_a_docstring():
    """Each field is documented in code (the string right after it), so the docs cannot drift from the code."""
    import ast
    import inspect

    import video_ens.config as config

    tree = ast.parse(inspect.getsource(config))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.endswith(("Config", "Recipe")) and node.name != "RecipeError":
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    has_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    assert has_doc, f"{node.name}.{stmt.target.id} has no docstring"


def test_every_section_is_a_dataclass_field():
    hints = typing.get_type_hints(Recipe)
    assert [f.name for f in dataclasses.fields(Recipe)] == ["description", *SECTIONS]
    assert all(dataclasses.is_dataclass(hints[s]) for s in SECTIONS)


def test_cli_validates_without_torch(tmp_path):
    src = _write(tmp_path, MINIMAL)
    code = (
        "import sys; from video_ens.config import main; rc = main(sys.argv[1:]);"
        "assert 'torch' not in sys.modules, 'config must not import torch'; sys.exit(rc)"
    )
    ok = subprocess.run([sys.executable, "-c", code, str(src), "--quiet"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-c", code, str(src), "--set", "optim.lrr=1"], capture_output=True, text=True)
    got = subprocess.run(
        [sys.executable, "-c", code, str(src), "--get", "data.train_shards"], capture_output=True, text=True
    )
    assert got.stdout == "data/t\n"
    assert bad.returncode == 2
    assert "unknown key 'optim.lrr'; did you mean 'optim.lr'?" in bad.stderr


def test_shipped_recipes_load():
    """Every recipe in recipes/ validates (and names a model that exists)."""
    from video_ens.models import MODELS

    recipes = sorted((ROOT / "recipes").glob("*.json"))
    for path in recipes:
        r = load_recipe(path)
        assert r.model.name in MODELS, f"{path.name}: unknown model {r.model.name}"


# ------------------------------------------------------------------------------------------------- model section


def _with_model(model: dict, **sections) -> dict:
    return {**json.loads(json.dumps(MINIMAL)), "model": model, **sections}


FEATURES = {"kind": "features", "train_shards": "data/t", "val_shards": "data/v"}


@pytest.mark.parametrize(
    "model, expect",
    [
        ({"name": "s3dg_ens3"}, "model.name: unknown model 's3dg_ens3'; did you mean 's3dg_ens2'? Known models: "),
        ({"name": "s3dg_tiny", "fork": "block9"}, "model.fork: 'block9' is not a layer of model s3dg_tiny. Valid"),
        (
            {"name": "s3dg_tiny", "fork": "Mixed4f"},
            "model.fork: 'Mixed4f' is not a layer of model s3dg_tiny; did you mean 'Mixed_4f'?",
        ),
        ({"name": "dbof_tiny", "fork": "MaxPool_4a"}, "Valid forks: pool"),
        ({"name": "s3dg_tiny", "options": {"bogus": 1}}, "model.options.bogus: unknown option of model s3dg_tiny"),
        ({"name": "s3dg_tiny", "options": {"kernel": "auto"}}, "did you mean 'model.options.kernels'? Valid options: "),
        ({"name": "s3dg_tiny", "options": {"dropuot": 0.1}}, "did you mean 'model.dropout'?"),
        (
            {"name": "s3dg_tiny", "options": {"dropout": 0.1}},
            "model.options.dropout: is a model field: set model.dropout",
        ),
        (
            {"name": "dbof_tiny", "options": {"cluster_size": "big"}},
            'model.options.cluster_size: expected an integer, got "big"',
        ),
        (
            {"name": "dbof_tiny", "options": {"branch_hidden_size": 2.5}},
            "model.options.branch_hidden_size: expected an integer, got 2.5",
        ),
        (
            {"name": "resnet_tiny", "options": {"widths": [8, "a", 32, 64]}},
            "model.options.widths[1]: expected an integer",
        ),
        ({"name": "resnet_tiny", "options": {"se": 1}}, "model.options.se: expected true or false"),
        ({"name": "s3dg_tiny", "options": {"kernels": 3}}, "model.options.kernels: expected a string"),
        (
            {"name": "s3dg_tiny", "options": {"kernels": "cuda"}},
            "model.options.kernels: kernels must be one of ('auto', ",
        ),
        (
            {"name": "resnet_tiny", "fork": "block9"},
            "model.fork: 'block9' is not a layer of model resnet_tiny; did you mean 'block4'? Valid forks: stem, block1, block2, block3, block4",
        ),
        # the forks and the checks see the preset's options under the recipe's: two blocks, and seresnet's se=True
        (
            {"name": "resnet_tiny", "fork": "block3", "options": {"widths": [8, 16], "units": [2, 2]}},
            "Valid forks: stem, block1, block2",
        ),
        (
            {"name": "seresnet_tiny", "options": {"se_reduction": 0}},
            "model.options.se_reduction: se_reduction must be >= 1",
        ),
    ],
)
def test_model_section_is_checked_against_the_builder(model, expect):
    raw = _with_model(model)
    if model["name"].startswith("dbof"):
        raw.update(data=FEATURES, objective={"loss": "sigmoid_bce"})
    msg = _error(raw)
    assert msg.startswith("t.json: ")
    assert expect in msg


def test_model_options_get_the_builders_types():
    r = recipe_from_dict(_with_model({"name": "resnet_tiny", "options": {"widths": [8, 16, 32, 64], "se": True}}))
    assert r.model.options == {"widths": (8, 16, 32, 64), "se": True}
    assert type(r.model.options["widths"][2]) is int
    with pytest.raises(RecipeError, match=r"model.options.widths\[2\]: expected an integer, got 32.0: write 32"):
        recipe_from_dict(_with_model({"name": "resnet_tiny", "options": {"widths": [8, 16, 32.0, 64]}}))
    r = recipe_from_dict(_with_model({"name": "s3dg_tiny", "options": {"widths_scale": 1, "kernels": "auto"}}))
    assert (
        r.model.options == {"widths_scale": 1.0, "kernels": "auto"} and type(r.model.options["widths_scale"]) is float
    )
    assert r.model.builder_kwargs() == {"widths_scale": 1.0, "kernels": "auto"}


def test_every_preset_and_its_own_keywords_validate():
    from video_ens.config import MODEL_FIELDS
    from video_ens.models import MODELS

    for name, (_, preset) in MODELS.items():
        options = {k: v for k, v in preset.items() if k not in MODEL_FIELDS}
        fields = {k: v for k, v in preset.items() if k in MODEL_FIELDS}
        raw = _with_model({"name": name, **fields, "options": json.loads(json.dumps(options))})
        if name.startswith("dbof"):
            raw.update(data=FEATURES, objective={"loss": "sigmoid_bce"})
        recipe_from_dict(raw)


def test_every_builder_takes_the_common_fields_and_its_options_dataclass():
    """The options are declared once, in model_options: a builder's keywords are the common fields plus `options`."""
    import inspect

    from video_ens.config import MODEL_FIELDS
    from video_ens.model_options import PRESETS
    from video_ens.models import BUILDERS, MODELS

    assert set(BUILDERS) == {cls for cls, _ in PRESETS.values()} and list(MODELS) == list(PRESETS)
    for cls, build in BUILDERS.items():
        params = inspect.signature(build).parameters
        assert list(params) == [*MODEL_FIELDS, "options"], build.__module__
        assert params["options"].annotation in (f"{cls.__name__} | None", cls | None)


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_model_options_kernels_reaches_every_fused_op(kernels, monkeypatch):
    """model.options.kernels, from the recipe through the options dataclass and the gates' constructors, is the
    `impl` each fused op receives (recorded where video_ens.kernels.runtime decides what runs)."""
    import torch

    from video_ens.kernels import runtime
    from video_ens.models import create_model

    seen = []
    decide = runtime.use_triton
    monkeypatch.setattr(runtime, "use_triton", lambda impl, op, *t: seen.append((op, impl)) or decide(impl, op, *t))
    for name, x, inputs in [
        ("s3dg_tiny", torch.randn(2, 3, 4, 32, 32), {}),
        ("dbof_tiny", torch.randn(2, 3, 1152), {"lengths": torch.tensor([3, 2])}),
    ]:
        raw = _with_model({"name": name, "options": {"kernels": kernels}})
        if name.startswith("dbof"):
            raw.update(data=FEATURES, objective={"loss": "sigmoid_bce"})
        r = recipe_from_dict(raw)
        model = create_model(r.model.name, **r.model.builder_kwargs())
        for training in (True, False):  # DBoF's context gate runs another op in each mode
            with torch.no_grad():
                model.train(training)(x, **inputs)
    assert {op for op, _ in seen} == {"feature_gate", "swap_pool", "gate_epilogue", "context_gate"}
    assert {impl for _, impl in seen} == {kernels}


def test_model_errors_stop_the_launch_check_without_torch(tmp_path):
    """`python -m video_ens.config` (launch.sh's first step) refuses a bad model section, still without torch."""
    src = _write(tmp_path, MINIMAL)
    code = (
        "import sys; from video_ens.config import main; rc = main(sys.argv[1:]);"
        "assert 'torch' not in sys.modules, 'config must not import torch'; sys.exit(rc)"
    )
    for override, expect in [
        ("model.name=s3dg_ens3", "model.name: unknown model 's3dg_ens3'"),
        ("model.fork=block9", "model.fork: 'block9' is not a layer"),
        ('model.options={"bogus": 1}', "model.options.bogus: unknown option"),
    ]:
        out = subprocess.run(
            [sys.executable, "-c", code, str(src), "--quiet", "--set", override], capture_output=True, text=True
        )
        assert out.returncode == 2, (override, out.stderr)
        assert expect in out.stderr


# ------------------------------------------------------------------------------------------- crops and eval scale


@pytest.mark.parametrize(
    "patch, expect",
    [
        (
            {"data": {"clip_crop": "resized"}},
            'data.clip_crop: "resized" is not one of "scale_jitter", "resized_crop"; did you mean "resized_crop"?',
        ),
        ({"data": {"crop_scale": [0.5, 0.2]}}, "data.crop_scale: must be [min, max] with 0 < min <= max <= 1"),
        ({"data": {"crop_scale": [0.5, 1.5]}}, "data.crop_scale: must be"),
        ({"data": {"crop_ratio": [0, 1]}}, "data.crop_ratio: must be [min, max] with 0 < min <= max"),
        ({"eval": {"short_side": 200}}, "eval.short_side: the evaluation crop 224 does not fit in the short side 200"),
        ({"eval": {"crop_size": 288}}, "eval.crop_size: the evaluation crop 288 does not fit in the short side 256"),
        ({"eval": {"short_side": 4}}, "eval.short_side: must be >= 8"),
    ],
)
def test_crop_and_eval_scale_errors(patch, expect):
    raw = json.loads(json.dumps(MINIMAL))
    for section, values in patch.items():
        raw[section] = {**raw.get(section, {}), **values}
    assert expect in _error(raw)


def test_eval_scale_defaults():
    r = recipe_from_dict(MINIMAL)
    assert (
        r.data.clip_crop == "scale_jitter" and r.data.crop_scale == (0.08, 1.0) and r.data.crop_ratio == (3 / 4, 4 / 3)
    )
    assert r.eval.short_side is None and r.eval.crop_size is None
    # clips: the low end of the training scale (S3D-G / I3D / PySlowFast: short side 256, crop 224)
    assert r.eval.view_size(r.data) == (256, 224)
    r = recipe_from_dict(apply_overrides(MINIMAL, ["data.short_side=[288, 320]", "eval.crop_size=256"]))
    assert r.eval.view_size(r.data) == (288, 256)
    # images: crop / 0.875, unless stated
    img = recipe_from_dict(apply_overrides(MINIMAL, ["data.kind=image", "model.name=resnet_tiny"]))
    assert img.eval.view_size(img.data) == (256, 224)
    img = recipe_from_dict(
        apply_overrides(
            MINIMAL, ["data.kind=image", "model.name=resnet_tiny", "data.crop_size=32", "data.short_side=[32, 36]"]
        )
    )
    assert img.eval.view_size(img.data) == (37, 32)


@pytest.mark.parametrize(
    "overrides, name",
    [
        (["eval.mode=full"], "full"),
        (["eval.mode=clips", "eval.num_clips=10", "eval.num_crops=3"], "clips10x3"),
        (["eval.mode=clips", "eval.num_clips=4", "eval.num_crops=1"], "clips4x1"),
        (["data.kind=image", "model.name=resnet_tiny", "eval.mode=clips"], "center_crop"),
        (["data.kind=features", "model.name=dbof_tiny", "objective.loss=sigmoid_bce"], "all_frames"),
    ],
)
def test_eval_view_name_names_what_a_sample_becomes(overrides, name):
    # the name of tools/eval.py's default folder (RUN_DIR/eval/<name>) and of an embeddings index's "mode"
    r = recipe_from_dict(apply_overrides(MINIMAL, overrides))
    assert r.eval.view_name(r.data) == name
    img = recipe_from_dict(
        apply_overrides(MINIMAL, ["data.kind=image", "model.name=resnet_tiny", "eval.short_side=288"])
    )
    assert img.eval.view_size(img.data) == (288, 224)


def test_paper_kinetics_recipes_evaluate_at_short_side_256_and_demos_at_their_crop():
    for path in sorted((ROOT / "recipes").glob("*kinetics*.json")):
        r = load_recipe(path)
        short, crop = r.eval.view_size(r.data)
        if path.name.startswith("demo_"):
            assert (short, crop) == (r.data.crop_size, r.data.crop_size), path.name  # what the demos always did
        else:
            assert (short, crop) == (256, 224), path.name


# ------------------------------------------------------------------------------------- values the run will use


@pytest.mark.parametrize(
    "override, expect",
    [
        ("train.seed=1e308", "train.seed: expected an integer, got 1e+308"),
        ("train.global_batch_size=32.0", "train.global_batch_size: expected an integer, got 32.0: write 32"),
        ("train.seed=-1", "train.seed: must be in [0, 2^63)"),
        (f"train.seed={2**63}", "train.seed: 9223372036854775808 is out of range"),
        (f"train.max_steps={2**64}", "train.max_steps: 18446744073709551616 is out of range"),
        ("data.num_workers=1e3", "data.num_workers: expected an integer, got 1000.0: write 1000"),
    ],
)
def test_integers_given_as_floats_or_out_of_range_stop_the_launch_check(tmp_path, override, expect):
    """`python -m video_ens.config` (before torchrun) refuses them: train.seed=1e308 used to fail only in
    torch.manual_seed, after the process group had started."""
    src = _write(tmp_path, MINIMAL)
    out = subprocess.run(
        [sys.executable, "-m", "video_ens.config", str(src), "--quiet", "--world-size", "2", "--set", override],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2, (override, out.stderr)
    assert expect in out.stderr


def test_the_learning_rate_is_checked_after_linear_scaling():
    """lr=1e308 is finite, but scaled to the global batch it is not: the check runs on the value the run uses."""
    raw = {
        **MINIMAL,
        "optim": {"lr": 1e308, "lr_scaling": "linear", "reference_batch_size": 256},
        "train": {"global_batch_size": 512},
    }
    assert 'optim.lr: with optim.lr_scaling "linear" the peak learning rate 1e+308 x 512 / 256 is inf' in _error(raw)
    raw["optim"]["lr_scaling"] = "none"
    assert recipe_from_dict(raw).optim.peak_lr(512) == 1e308


# ------------------------------------------------------------------------------------------- run folder names


def test_default_run_folder_names_differ_across_seeds_and_overrides(tmp_path):
    """runs/<recipe file name> for the recipe as written; a suffix hashing the fields whose overrides make another
    run (the seed, the lr, ...); fields a resume may change (length, workers, evaluation, train.resume) keep it."""
    from video_ens.config import default_run_dir

    src = _write(tmp_path, MINIMAL)
    plain = default_run_dir(src, [])
    assert plain == Path("runs") / "r"
    for same in (
        ["train.max_steps=100"],
        ["data.num_workers=8", "eval.batch_size=2"],
        ["train.resume=force"],
        ["train.seed=0"],
        ["optim.lr=0.1"],
    ):  # 0 and 0.1 are the values the file resolves to
        assert default_run_dir(src, same) == plain, same
    seed1 = default_run_dir(src, ["train.seed=1"])
    assert seed1.parent == plain.parent and seed1.name.startswith("r-") and len(seed1.name) == len("r-") + 8
    assert default_run_dir(src, ["train.seed=1", "train.max_steps=9"]) == seed1
    others = {
        seed1,
        default_run_dir(src, ["train.seed=2"]),
        default_run_dir(src, ["optim.lr=0.2"]),
        default_run_dir(src, ["train.seed=1", "optim.lr=0.2"]),
    }
    assert len(others) == 4 and plain not in others


def test_resume_differences_name_the_fields_a_resume_may_not_change():
    from video_ens.config import resume_differences

    old = recipe_to_dict(recipe_from_dict(MINIMAL))
    new = recipe_from_dict(
        apply_overrides(
            MINIMAL,
            [
                "train.seed=3",
                "optim.lr=0.2",
                "train.max_steps=50",
                "data.num_workers=1",
                "eval.num_clips=2",
                "description=x",
            ],
        )
    )
    assert resume_differences(old, new) == ["optim.lr: 0.1 -> 0.2", "train.seed: 0 -> 3"]
    # a field the checkpoint's code did not have counts as its default; one this code no longer has is ignored
    del old["data"]["frame_stride"]
    old["data"]["retired_field"] = 1
    assert resume_differences(old, recipe_from_dict(MINIMAL)) == []

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
    r = recipe_from_dict(apply_overrides(MINIMAL, ["optim.lr=0.5", "objective.structure=ensembling",
                                                    "objective.weight=-1.5", "data.short_side=[240, 300]",
                                                    "train.max_steps=null", "model.options.hidden_size=30"]))
    assert r.optim.lr == 0.5
    assert r.objective.structure == "ensembling" and r.objective.weight == -1.5
    assert r.data.short_side == (240, 300)
    assert r.model.options == {"hidden_size": 30}
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
    got = subprocess.run([sys.executable, "-c", code, str(src), "--get", "data.train_shards"], capture_output=True,
                         text=True)
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

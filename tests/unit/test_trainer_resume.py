"""What a resume reports when the run that wrote the checkpoint was set up differently (the data order depends on
data.num_workers, the world size, the batch and the seeds, so such a resume is valid but not exact)."""

from __future__ import annotations

import copy

from video_ens.config import load_recipe, recipe_to_dict
from video_ens.trainer import resume_changes

RECIPE = recipe_to_dict(load_recipe("recipes/demo_yt8m_dbof_mu2.json"))


def _state(recipe=RECIPE, world_size=2):
    return {"step": 40, "recipe": copy.deepcopy(recipe), "world_size": world_size}


def test_the_same_setup_reports_nothing():
    assert resume_changes(_state(), copy.deepcopy(RECIPE), 2) == []


def test_worker_count_world_size_and_seed_are_named_with_both_values():
    new = copy.deepcopy(RECIPE)
    new["data"]["num_workers"] = 3
    new["train"]["seed"] = RECIPE["train"]["seed"] + 1
    assert resume_changes(_state(), new, 4) == [
        f"data.num_workers: {RECIPE['data']['num_workers']!r} -> 3",
        f"train.seed: {RECIPE['train']['seed']!r} -> {RECIPE['train']['seed'] + 1!r}",
        "world size: 2 -> 4",
    ]


def test_extending_or_re_pacing_a_run_is_not_a_change():
    new = copy.deepcopy(RECIPE)
    new["train"].update(epochs=50, max_steps=1000, checkpoint_every=7, eval_every=9, log_every=3, keep_checkpoints=5)
    new["description"] = "longer"
    assert resume_changes(_state(), new, 2) == []
    # forcing a resume or waiting longer for a stuck rank or worker changes nothing the run computes
    new["train"].update(resume="force", collective_timeout_s=1800.0)
    new["data"]["worker_timeout_s"] = 900.0
    assert resume_changes(_state(), new, 2) == []


def test_model_options_compare_as_one_value_and_old_checkpoints_without_the_fields_pass():
    new = copy.deepcopy(RECIPE)
    new["model"]["options"] = {**RECIPE["model"].get("options", {}), "kernels": "auto"}
    (change,) = resume_changes(_state(), new, 2)
    assert change.startswith("model.options: ") and "'kernels': 'auto'" in change
    assert resume_changes({"step": 3}, new, 8) == []  # a checkpoint from before these fields existed

"""Checks train.py makes before it builds the engine: the classifier width against the dataset's label map."""

from __future__ import annotations

import pytest

from video_ens.config import RecipeError, load_recipe
from video_ens.train import check_num_classes


def test_a_classifier_narrower_or_wider_than_the_label_map_is_named_with_the_fix():
    recipe = load_recipe("recipes/demo_kinetics_s3dg_mu2.json")  # s3dg_tiny_ens2 preset: 8 classes
    check_num_classes(recipe, 8, "data/demo/kinetics/train")
    with pytest.raises(RecipeError, match=r"model.num_classes: .* has 8 classes but the dataset d/train has 400: "
                                          r"set model.num_classes to 400"):
        check_num_classes(recipe, 400, "d/train")


def test_the_recipe_value_wins_over_the_preset():
    recipe = load_recipe("recipes/demo_kinetics_s3dg_mu2.json", ["model.num_classes=400"])
    check_num_classes(recipe, 400, "d/train")
    with pytest.raises(RecipeError, match="has 400 classes but the dataset d/train has 8"):
        check_num_classes(recipe, 8, "d/train")

"""Checks train.py makes before it builds the engine: the classifier width against the dataset's label map."""

from __future__ import annotations

import pytest

from video_ens.config import RecipeError, load_recipe
from video_ens.train import check_num_classes


def test_a_classifier_narrower_or_wider_than_the_label_map_is_named_with_the_fix():
    recipe = load_recipe("recipes/demo_kinetics_s3dg_mu2.json")  # s3dg_tiny_ens2 preset: 8 classes
    check_num_classes(recipe, 8, "data/demo/kinetics/train")
    with pytest.raises(
        RecipeError,
        match=r"model.num_classes: .* has 8 classes but the dataset d/train has 400: "
        r"set model.num_classes to 400",
    ):
        check_num_classes(recipe, 400, "d/train")


def test_the_recipe_value_wins_over_the_preset():
    recipe = load_recipe("recipes/demo_kinetics_s3dg_mu2.json", ["model.num_classes=400"])
    check_num_classes(recipe, 400, "d/train")
    with pytest.raises(RecipeError, match="has 400 classes but the dataset d/train has 8"):
        check_num_classes(recipe, 8, "d/train")


def test_a_locked_run_folder_names_its_owner_and_a_dead_owner_leaves_no_lock(tmp_path):
    """The lock is the kernel's (a POSIX lock on RUN/.lock): held for the owner's life, gone when it dies, even by
    SIGKILL, although the file stays."""
    import socket
    import subprocess
    import sys

    from video_ens.train import lock_run_folder, run_folder_owner

    run = tmp_path / "run"
    code = (
        "import sys, time; from pathlib import Path; from video_ens.train import lock_run_folder; "
        "lock_run_folder(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        owner = run_folder_owner(run)
        assert owner is not None and (owner["pid"], owner["host"]) == (holder.pid, socket.gethostname())
        with pytest.raises(RecipeError, match=rf"run folder {run} is in use by pid {holder.pid} on host "):
            lock_run_folder(run)
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".lock").exists() and run_folder_owner(run) is None
    lock_run_folder(run)  # this process owns it now
    assert run_folder_owner(run) is None  # a process never conflicts with its own lock

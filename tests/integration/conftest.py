"""Fixtures the integration tests share: the demo datasets, each made once per session however many modules ask for
it (tests/conftest.py holds `one_thread`, which unit tests take too)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Callable[..., Path]:
    """demo_data(kind, **sizes): the folder (train/ and val/) of the demo dataset `kind` ("kinetics", "yt8m" or
    "images") made by video_ens.data.demo.make_<kind>(folder, **sizes). Made on first use; a later call with the same
    arguments, from any module, gets the same folder, so tests only read it."""
    from video_ens.data import demo

    make = {"kinetics": demo.make_kinetics, "yt8m": demo.make_yt8m, "images": demo.make_images}
    made: dict[tuple, Path] = {}

    def get(kind: str, **sizes) -> Path:
        key = (kind, tuple(sorted(sizes.items())))
        if key not in made:
            root = tmp_path_factory.mktemp("demo") / kind
            make[kind](str(root), **sizes)
            made[key] = root
        return made[key]

    return get

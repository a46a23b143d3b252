"""The options tools share (video_ens/cli.py): which model a tool runs, and how a converter ends."""

import argparse
import errno
import subprocess
import sys
from pathlib import Path

import pytest

from video_ens import cli


def _model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tool")
    cli.add_model_source(p, "which model")
    cli.add_overrides(p, "eval.mode=clips")
    cli.add_device(p)
    cli.add_precision(p)
    return p


def _parse(*argv: str) -> argparse.Namespace:
    p = _model_parser()
    args = p.parse_args(argv)
    cli.check_model_source(p, args)
    return args


def test_run_dir_names_its_recipe_and_weights():
    args = _parse("--run-dir", "runs/a")
    assert cli.model_files(args) == (Path("runs/a/recipe.json"), Path("runs/a/model.safetensors"))
    assert args.overrides == [] and args.device is None and args.precision is None


def test_recipe_and_weights_win_over_the_run_folder():
    args = _parse("--run-dir", "runs/a", "--weights", "w.safetensors")
    assert cli.model_files(args) == (Path("runs/a/recipe.json"), Path("w.safetensors"))
    args = _parse("--recipe", "r.json", "--weights", "w.safetensors")
    assert cli.model_files(args) == (Path("r.json"), Path("w.safetensors"))


@pytest.mark.parametrize("argv", [(), ("--recipe", "r.json"), ("--weights", "w.safetensors")])
def test_a_model_needs_a_run_dir_or_recipe_and_weights(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    assert e.value.code == 2
    assert "tool: error: give --run-dir, or both --recipe and --weights" in capsys.readouterr().err


def test_set_device_and_precision():
    args = _parse("--run-dir", "r", "--set", "a.b=1", "--set", "c=x", "--device", "cpu", "--precision", "bf16")
    assert args.overrides == ["a.b=1", "c=x"] and args.device == "cpu" and args.precision == "bf16"
    with pytest.raises(SystemExit):
        _parse("--run-dir", "r", "--precision", "fp64")
    assert "recipe override, e.g. eval.mode=clips" in _model_parser().format_help()


def _converter_parser(shuffle_order: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_x")
    cli.add_converter_options(
        p,
        timeout=5.0,
        timeout_item="a widget",
        on_hang="the widget is dropped",
        shard_size=7,
        shard_item="widgets",
        shuffle_order=shuffle_order,
    )
    return p


def test_converter_options_become_convert_keywords():
    p = _converter_parser("the listed order")
    kwargs = cli.converter_kwargs(p.parse_args([]))
    assert kwargs.pop("workers") >= 1
    assert kwargs == {"timeout": 5.0, "shard_size": 7, "seed": 0, "overwrite": False}
    a = p.parse_args(["--workers", "2", "--timeout", "1.5", "--shard-size", "3", "--seed", "9", "--overwrite"])
    assert cli.converter_kwargs(a) == {"workers": 2, "timeout": 1.5, "shard_size": 3, "seed": 9, "overwrite": True}
    assert cli.converter_kwargs(p.parse_args(["--seed", "9", "--no-shuffle"]))["seed"] is None
    text = " ".join(p.format_help().split())
    assert "seconds a widget may take (with --workers > 1): the widget is dropped" in text
    assert "widgets per shard" in text and "keep the listed order" in text
    assert "replace an existing dataset at --out" in text


def test_a_converter_that_keeps_its_input_order_takes_no_seed():
    p = _converter_parser(None)
    assert "seed" not in cli.converter_kwargs(p.parse_args([]))
    with pytest.raises(SystemExit):
        p.parse_args(["--seed", "1"])


def test_run_converter_prints_the_summary_and_the_time(capsys):
    assert cli.run_converter("convert_x", lambda: 3, lambda n: [f"out: {n} samples", "  note"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["out: 3 samples", "  note"]
    assert len(out) == 3 and out[2].startswith("  took ") and out[2].endswith(" s")


@pytest.mark.parametrize(
    "error, code",
    [
        (ValueError("bad value"), 2),
        (FileExistsError("out exists"), 2),
        (FileNotFoundError("no input"), 2),
        (OSError(errno.ENOSPC, "No space left on device", "shard.tar"), 1),
    ],
)
def test_run_converter_errors(error, code, capsys):
    def fail():
        raise error

    assert cli.run_converter("convert_x", fail, lambda _: ["never"]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"convert_x: error: {error}")
    assert ("nothing was published" in captured.err) == (code == 1)


def test_imports_no_torch():
    code = "import sys, video_ens.cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_precision_and_device_choices_are_the_recipe_values():
    # cli.py stays free of video_ens imports, so it spells the recipe's choices again: they must not drift apart.
    import typing

    from video_ens.sections import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["precision"]) == cli.PRECISIONS
    assert typing.get_args(hints["device"]) == cli.DEVICES

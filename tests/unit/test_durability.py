"""Durability of what we publish: each file is fsynced before the rename that publishes it and its folder after it,
and a full disk fails with the path named, leaving what was there before.

The order of fsyncs and renames is recorded by wrapping os.fsync / os.replace / os.rename (by inode, so a file is
recognised across renames). Disk-full faults are real: a file-size limit (RLIMIT_FSIZE) in a subprocess, where
writes past the limit fail with EFBIG (Python ignores SIGXFSZ, so the write raises instead of the process dying).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from video_ens import engine
from video_ens.config import load_recipe
from video_ens.data import schema
from video_ens.data.writer import DatasetWriter, ShardSeries

ROOT = Path(__file__).resolve().parents[2]


class Trace:
    """Records ("fsync", inode) and ("rename", inode of what was renamed, destination) in call order."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            self.events.append(("fsync", os.fstat(fd).st_ino))
            return real_fsync(fd)

        def renamer(real):
            def rename(src, dst, *args, **kwargs):
                real(src, dst, *args, **kwargs)
                self.events.append(("rename", os.stat(dst).st_ino, os.path.abspath(os.fspath(dst))))

            return rename

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", renamer(real_replace))
        monkeypatch.setattr(os, "rename", renamer(real_rename))

    def rename_of(self, dst) -> int:
        """Index of the (last) rename onto `dst`."""
        dst = os.path.abspath(os.fspath(dst))
        found = [i for i, e in enumerate(self.events) if e[0] == "rename" and e[2] == dst]
        assert found, f"nothing was renamed onto {dst}: {self.events}"
        return found[-1]

    def fsynced(self, inode: int, *, before: int | None = None, after: int | None = None) -> bool:
        lo = -1 if after is None else after
        hi = len(self.events) if before is None else before
        return any(e == ("fsync", inode) for e in self.events[lo + 1 : hi])


def _ino(path) -> int:
    return os.stat(path).st_ino


def _run_with_file_size_limit(code: str, limit: int) -> subprocess.CompletedProcess:
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        preexec_fn=set_limit,
        capture_output=True,
        text=True,
        timeout=60,
    )


# ---------------------------------------------------------------------------------------------------------------
# The helper
# ---------------------------------------------------------------------------------------------------------------


def test_write_atomic_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    from video_ens.durable import write_atomic

    trace = Trace(monkeypatch)
    write_atomic(tmp_path / "a.json", '{"x": 1}')
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.json").read_text() == '{"x": 1}' and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    for name in ("a.json", "b.bin"):
        i = trace.rename_of(tmp_path / name)
        assert trace.fsynced(_ino(tmp_path / name), before=i), trace.events
        assert trace.fsynced(_ino(tmp_path), after=i), trace.events
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin"]  # no temporary file left


def test_write_atomic_on_a_full_disk_names_the_path_and_keeps_the_old_file(tmp_path):
    (tmp_path / "out.bin").write_bytes(b"old")
    proc = _run_with_file_size_limit(
        f"""
        from video_ens.durable import write_atomic
        try:
            write_atomic({str(tmp_path / "out.bin")!r}, b"x" * 200_000)
        except OSError as e:
            print("errno", e.errno, "filename", e.filename, "str", e)
        """,
        limit=64 * 1024,
    )
    assert proc.returncode == 0, proc.stderr
    assert "errno 27" in proc.stdout and f"filename {tmp_path / 'out.bin'} " in proc.stdout, proc.stdout
    assert "File too large" in proc.stdout
    assert (tmp_path / "out.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


# ---------------------------------------------------------------------------------------------------------------
# Dataset folders (video_ens/data/writer.py)
# ---------------------------------------------------------------------------------------------------------------


def _sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    return schema.encode_yt8m_sample(
        key=schema.make_key(i, f"v{i}"),
        video_id=f"v{i}",
        rgb=rng.integers(0, 256, (3, schema.YT8M_RGB_DIM), dtype=np.uint8),
        audio=rng.integers(0, 256, (3, schema.YT8M_AUDIO_DIM), dtype=np.uint8),
        labels=[1],
    )


def test_dataset_shards_are_fsynced_before_the_folder_is_published_and_its_parent_after(tmp_path, monkeypatch):
    trace = Trace(monkeypatch)
    out = tmp_path / "data" / "train"
    with DatasetWriter(out, kind="yt8m", converter={"name": "test"}, shard_size=2) as w:
        for i in range(3):  # written by the writer itself: shards _seq0000-000000 and -000001
            w.write(_sample(i))
        series = ShardSeries(w.parts_dir, "part000000", shard_size=2)  # as a converter's worker process does
        for i in range(3, 6):
            series.write(_sample(i))
        w.add_shards(series.close())
        info = w.commit(num_classes=3862, label_names=None)
    assert [s.count for s in info.shards] == [2, 1, 2, 1]
    published = trace.rename_of(out)
    for name in [s.name for s in info.shards] + [schema.INFO_NAME]:
        assert trace.fsynced(_ino(out / name), before=published), f"{name} was not fsynced before publishing"
    assert trace.fsynced(_ino(out), before=published), "the folder's entries were not fsynced before publishing"
    assert trace.fsynced(_ino(out.parent), after=published), "the parent folder was not fsynced after the rename"
    assert sorted(os.listdir(out.parent)) == ["train"]


def test_replacing_a_dataset_fsyncs_the_parent_after_the_rename(tmp_path, monkeypatch):
    out = tmp_path / "train"
    for overwrite in (False, True):
        with DatasetWriter(out, kind="yt8m", converter={"name": "test"}, shard_size=2, overwrite=overwrite) as w:
            w.write(_sample(0))
            if overwrite:
                trace = Trace(monkeypatch)
            w.commit(num_classes=3862, label_names=None)
    published = trace.rename_of(out)
    assert trace.fsynced(_ino(out / "train-000000.tar"), before=published)
    assert trace.fsynced(_ino(tmp_path), after=published)
    assert sorted(os.listdir(tmp_path)) == ["train"]  # the old dataset is gone, not left under a hidden name


def test_a_failed_publish_keeps_the_dataset_it_was_to_replace(tmp_path, monkeypatch):
    out = tmp_path / "train"
    with DatasetWriter(out, kind="yt8m", converter={"name": "old"}, shard_size=2) as w:
        w.write(_sample(0))
        w.commit(num_classes=3862, label_names=None)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(".train.partial-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), src)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        with DatasetWriter(out, kind="yt8m", converter={"name": "new"}, shard_size=2, overwrite=True) as w:
            w.write(_sample(1))
            w.commit(num_classes=3862, label_names=None)
    assert schema.read_info(out).converter["name"] == "old"
    assert sorted(os.listdir(tmp_path)) == ["train"]


def test_a_shard_whose_fsync_fails_is_named(tmp_path, monkeypatch):
    """On NFS a full disk can first show at fsync, after every write() succeeded."""

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    series = ShardSeries(str(tmp_path), "part000000", shard_size=2)
    series.write(_sample(0))
    series.write(_sample(1))
    with pytest.raises(OSError, match=r"No space left on device: '.*/part000000-000000\.tar'"):
        series.write(_sample(2))  # shard 0 is full: closed and fsynced before shard 1 opens
    series.abort()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (video_ens/engine.py)
# ---------------------------------------------------------------------------------------------------------------


class _FakeEngine:
    """Writes one file per checkpoint, as DeepSpeed's engine writes its per-rank files."""

    def save_checkpoint(self, root, *, tag, client_state, save_latest):
        os.makedirs(os.path.join(root, tag))
        with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(json.dumps(client_state).encode())


def test_checkpoint_complete_marker_is_fsynced_before_the_commit_rename(tmp_path, monkeypatch):
    trace = Trace(monkeypatch)
    final = engine.save_checkpoint(_FakeEngine(), tmp_path / "ckpt", 7, {"step": 7}, keep=2)
    committed = trace.rename_of(final)
    assert json.loads((final / "complete.json").read_text()) == {"step": 7, "world_size": 1}
    assert trace.fsynced(_ino(final / "complete.json"), before=committed), "complete.json was not fsynced"
    assert trace.fsynced(_ino(final / "mp_rank_00_model_states.pt"), before=committed)
    marker = max(i for i, e in enumerate(trace.events) if e[0] == "rename" and e[1] == _ino(final / "complete.json"))
    assert trace.fsynced(_ino(final), after=marker, before=committed), "the marker's folder entry was not fsynced"
    assert trace.fsynced(_ino(tmp_path / "ckpt"), after=committed)
    assert sorted(os.listdir(final)) == ["complete.json", "mp_rank_00_model_states.pt"]


# ---------------------------------------------------------------------------------------------------------------
# Run outputs (video_ens/train.py)
# ---------------------------------------------------------------------------------------------------------------


def _weights(n: int) -> dict[str, torch.Tensor]:
    return {"base.w": torch.arange(n, dtype=torch.float32), "ensembler.b": torch.ones(3)}


def test_run_outputs_write_the_weights_first_and_fsync_each_before_its_rename(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from video_ens.train import _write_outputs

    recipe = load_recipe(ROOT / "recipes" / "demo_yt8m_dbof_mu2.json")
    trace = Trace(monkeypatch)
    _write_outputs(tmp_path, {"ensemble": {"top1": 0.5}, "num_samples": 4}, _weights(10), recipe)
    weights, evaluation = trace.rename_of(tmp_path / "model.safetensors"), trace.rename_of(tmp_path / "eval.json")
    assert weights < evaluation, "eval.json was published before the weights it describes"
    for name, i in (("model.safetensors", weights), ("eval.json", evaluation)):
        assert trace.fsynced(_ino(tmp_path / name), before=i), f"{name} was not fsynced before its rename"
        assert trace.fsynced(_ino(tmp_path), after=i), f"the run folder was not fsynced after {name}'s rename"
    assert torch.equal(load_file(tmp_path / "model.safetensors")["base.w"], torch.arange(10, dtype=torch.float32))
    assert json.loads((tmp_path / "eval.json").read_text())["ensemble"] == {"top1": 0.5}
    assert sorted(os.listdir(tmp_path)) == ["eval.json", "model.safetensors"]


def test_run_outputs_on_a_full_disk_name_the_path_and_leave_the_previous_pair(tmp_path):
    (tmp_path / "eval.json").write_text('{"old": true}\n')
    (tmp_path / "model.safetensors").write_bytes(b"old weights")
    proc = _run_with_file_size_limit(
        f"""
        from pathlib import Path
        import torch
        from video_ens.config import load_recipe
        from video_ens.train import _write_outputs
        recipe = load_recipe("recipes/demo_yt8m_dbof_mu2.json")
        weights = {{"base.w": torch.zeros(50_000)}}  # 200 KB, past the 64 KB limit
        try:
            _write_outputs(Path({str(tmp_path)!r}), {{"ensemble": {{"top1": 0.5}}}}, weights, recipe)
        except Exception as e:
            print("error", type(e).__name__, e)
        """,
        limit=64 * 1024,
    )
    assert proc.returncode == 0, proc.stderr
    assert "error" in proc.stdout, proc.stdout
    assert "File too large" in proc.stdout and str(tmp_path / "model.safetensors") in proc.stdout, proc.stdout
    assert (tmp_path / "eval.json").read_text() == '{"old": true}\n'  # not replaced: it would describe no weights
    assert (tmp_path / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(os.listdir(tmp_path)) == ["eval.json", "model.safetensors"]


def test_the_resolved_recipe_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """recipe.json is what a resume compares against: a crash must leave the old one or the whole new one."""
    from video_ens.config import dump_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo_kinetics_s3dg_mu2.json")
    trace = Trace(monkeypatch)
    dump_recipe(recipe, tmp_path / "recipe.json")
    i = trace.rename_of(tmp_path / "recipe.json")
    assert trace.fsynced(_ino(tmp_path / "recipe.json"), before=i), trace.events
    assert trace.fsynced(_ino(tmp_path), after=i), trace.events
    assert load_recipe(tmp_path / "recipe.json") == recipe and os.listdir(tmp_path) == ["recipe.json"]

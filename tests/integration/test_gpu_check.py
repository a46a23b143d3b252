"""benchmarks/gpu_check.sh, the script a GPU session runs blind on a short lease, runs end to end: here in its
SMOKE mode (CPU, Triton's interpreter, tiny shapes, a 20-step demo run), every section finishing and writing its
rows (about 50 s)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import video_ens.kernels as K

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not K.triton_available(), reason="triton does not import")
def test_gpu_check_script_runs_every_section(tmp_path):
    env = dict(os.environ, SMOKE="1", PYTHON=sys.executable, OUT=str(tmp_path), BUDGET_S="400")
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=600, env=env
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # eight files: as many as a lent machine sends back
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "env.txt", "kernels_gates.csv", "kernels_models.csv", "kernels_swap.csv", "log.txt", "step_s3dg.csv",
        "summary.txt", "train_metrics.jsonl",
    ]  # fmt: skip
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    names = ["pytest_cuda", "kernels_swap", "kernels_models", "kernels_gates", "train_demo", "step_s3dg", "train_fp16"]
    assert [line.split(":")[0].removeprefix("== ") for line in summary] == names
    assert all(": exit 0 after" in line for line in summary), summary
    assert " passed" in (tmp_path / "log.txt").read_text()

    def rows(name: str) -> list[dict]:
        with open(tmp_path / name, newline="") as f:
            return list(csv.DictReader(f))

    swap, models, gates = rows("kernels_swap.csv"), rows("kernels_models.csv"), rows("kernels_gates.csv")
    for r in swap + models + gates:
        assert not r["error"], r
        assert float(r["ms"]) > 0
    # 3 passes x (eager, triton) for the one smoke shape
    assert {(r["pas"], r["impl"]) for r in swap} == {
        (p, i) for p in ("fwd", "bwd", "fwdbwd") for i in ("eager", "triton")
    }
    assert {r["op"] for r in models} == {"train_step:dbof_tiny", "train_step:s3dg_tiny"}
    assert {r["impl"] for r in models} == {"model:kernels=reference", "model:kernels=triton"}
    assert {r["op"] for r in gates} == {"feature_gate", "context_gate", "gate_epilogue"}
    assert {r["layout"] for r in gates if r["op"] == "feature_gate"} == {"contiguous", "channels_last_3d"}

    # the demo training ran its 20 steps (the smoke length) and evaluated; the step benchmark timed both loops
    log = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log if r["kind"] == "train") == 20
    assert any(r["kind"] == "eval" and r["step"] == 20 for r in log)
    assert [r["loop"] for r in rows("step_s3dg.csv")] == ["plain", "engine"]

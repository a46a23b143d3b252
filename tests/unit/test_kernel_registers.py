"""Every Triton kernel, variant and autotune config compiles for an H100 (sm_90) without spilling registers.

Runs benchmarks/ptxas_report.py, which compiles them all with Triton's bundled ptxas and no GPU (about 5 s on two
CPU cores), and reads its CSV. A spill puts registers in local memory (L1 / HBM traffic in a memory-bound kernel);
over 255 registers per thread cannot launch at all. The vectorization of the tiles is checked in test_kernels.py.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import video_ens.kernels as K

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ptxas_report.py"


@pytest.mark.skipif(not K.triton_available(), reason="triton does not import")
def test_no_kernel_config_spills_on_sm90(tmp_path):
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    out = tmp_path / "ptxas.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script drops it too
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stdout + run.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))

    # The kernels each module builds (in this process, interpreted or not: only their names are used).
    expected = set()
    for name in ("swap", "context_gate", "feature_gate"):
        kernels = importlib.import_module(f"video_ens.kernels.{name}")._kernels()
        expected |= {f"{name}.{attr}" for attr in vars(kernels) if attr != "triton"}
    assert {r["kernel"] for r in rows} == expected

    for r in rows:
        where = f"{r['kernel']} {r['variant']} {r['config']} w{r['num_warps']} s{r['num_stages']}"
        assert int(r["spill_st"]) == 0 and int(r["spill_ld"]) == 0, f"{where} spills: {r}"
        assert 0 < int(r["regs"]) <= 255, f"{where}: {r['regs']} registers per thread"

"""What every benchmark records beside its numbers: the code it measured."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_sha(*paths: str) -> str:
    """The checkout's short SHA, with "-dirty" when `paths` (default: the package and the benchmarks) hold
    uncommitted or untracked changes, so a number is never credited to code that was not committed.

    VIDEO_ENS_GIT_SHA overrides it: a copy of the tree without .git (on a lent GPU machine) passes the SHA in.
    """
    if os.environ.get("VIDEO_ENS_GIT_SHA"):
        return os.environ["VIDEO_ENS_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if sha.returncode != 0:
            return "unknown"
        # benchmarks/results is what the benchmarks write, not code: a run that appends to a CSV there is still clean
        where = paths or ("video_ens", "benchmarks", ":(exclude)benchmarks/results")
        status = ["git", "status", "--porcelain", "--", *where]
        dirty = subprocess.run(status, cwd=ROOT, capture_output=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"

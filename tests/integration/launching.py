"""What the multi-process tests share: a free port, the environment a launched job gets, and launch.sh on a recipe.

out = launch(recipe_dict, tmp_path / "run", nproc=2)      # CompletedProcess (check=True: exit 0 asserted)
proc = launch(recipe_dict, run_dir, background=True)       # Popen, in its own session (killpg-able)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict:
    """This environment without a surrounding job's rank variables, on this interpreter's venv, one thread per
    process (the tests share two cores), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(VIRTUAL_ENV=str(Path(sys.executable).parent.parent), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def launch(
    recipe: dict,
    run_dir: Path,
    *,
    nproc: int = 2,
    env: dict | None = None,
    extra: tuple[str, ...] | list[str] = (),
    timeout: float = 600,
    background: bool = False,
    check: bool = False,
):
    """`bash launch.sh RECIPE --run-dir RUN_DIR *extra` with the recipe written beside the run folder."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.recipe.json"
    path.write_text(json.dumps(recipe))
    cmd = ["bash", str(ROOT / "launch.sh"), str(path), "--run-dir", str(run_dir), *extra]
    env = env or launch_env(NPROC=str(nproc), MASTER_PORT=str(free_port()))
    if background:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun starts its workers in their own sessions, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_job(proc: subprocess.Popen) -> list[int]:
    """SIGSTOP, then SIGKILL, the launcher and every process under it, as a node failure would (frozen first, so
    nothing runs on between the kills); returns their pids."""
    victims = [proc.pid, *descendants(proc.pid)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return victims

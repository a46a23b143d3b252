"""How the integration tests start what they test: launch.sh on a recipe, `python -m video_ens.train` as one
process, a tools/ script in a subprocess (alone or under torchrun) or loaded as a module; the environment every
child gets; and the process tree of a job, to kill it as a node failure would.

out = launch(recipe_dict, tmp_path / "run", nproc=2)          # CompletedProcess (check=True: exit 0 asserted)
proc = launch(recipe_dict, run_dir, background=True)           # Popen, in its own session (killpg-able)
out = run_tool("eval", "--run-dir", str(run), nproc=2)         # tools/eval.py on two gloo ranks
out = run_command(torchrun(str(script), nproc=4), check=True)  # any command, in launch_env()
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


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


def assert_ok(out: subprocess.CompletedProcess) -> None:
    """Exit status 0, or a failure that names the command and shows how its output ended."""
    cmd = " ".join(map(str, out.args))
    assert out.returncode == 0, f"{cmd}: exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"


def run_command(
    cmd: list[str], *, cwd: Path | None = None, env: dict | None = None, timeout: float = 300, check: bool = False
) -> subprocess.CompletedProcess:
    """`cmd` to its end in launch_env() (or `env`), its output kept as text; check=True asserts exit 0."""
    out = subprocess.run(cmd, cwd=cwd, env=env or launch_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert_ok(out)
    return out


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """The command line of torchrun on this interpreter: `nproc` processes on this machine, rendezvous on a free
    port, each running `args` (a script and its arguments, or -m and a module)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *args,
    ]


def run_tool(
    name: str, *args: str, nproc: int | None = None, timeout: float = 300, check: bool = False
) -> subprocess.CompletedProcess:
    """`python tools/NAME.py *args` from the repository root, or under torchrun on `nproc` ranks."""
    script = str(TOOLS / f"{name}.py")
    cmd = [sys.executable, script, *args] if nproc is None else torchrun(script, *args, nproc=nproc)
    return run_command(cmd, cwd=ROOT, timeout=timeout, check=check)


def load_tool(name: str):
    """tools/NAME.py loaded from its file, to call its functions in this process: tools/ is no package and never
    on sys.path (the module is named cli_NAME, so no tool shadows a library module)."""
    spec = importlib.util.spec_from_file_location(f"cli_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_recipe(recipe: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe))
    return path


def train_process(
    recipe: Path, *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m video_ens.train RECIPE *args` as one process (no torchrun): the rank-side checks, without
    launch.sh's."""
    return run_command([sys.executable, "-m", "video_ens.train", str(recipe), *args], cwd=cwd, timeout=timeout)


def launch_sh(
    recipe: Path,
    *args: str,
    nproc: int = 2,
    env: dict | None = None,
    cwd: Path | None = None,
    timeout: float = 600,
    background: bool = False,
    check: bool = False,
):
    """`bash launch.sh RECIPE *args` on `nproc` local ranks (`env` instead of launch_env(NPROC, MASTER_PORT));
    background=True returns the Popen, in its own session, its output merged into stdout."""
    cmd = ["bash", str(ROOT / "launch.sh"), str(recipe), *args]
    env = env or launch_env(NPROC=str(nproc), MASTER_PORT=str(free_port()))
    if background:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    return run_command(cmd, cwd=cwd, env=env, timeout=timeout, check=check)


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
    """launch_sh on `recipe` written beside the run folder, with --run-dir RUN_DIR and `extra`."""
    path = write_recipe(recipe, run_dir.parent / f"{run_dir.name}.recipe.json")
    return launch_sh(
        path,
        "--run-dir",
        str(run_dir),
        *extra,
        nproc=nproc,
        env=env,
        timeout=timeout,
        background=background,
        check=check,
    )


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

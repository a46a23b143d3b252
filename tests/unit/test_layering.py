"""The package keeps its import table (style.md): heavy dependencies in one place each, imports flowing one way."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "video_ens"

# Lower layers first. A module may import from lower layers only (so models and data never import each other).
LAYERS = [
    {"config", "dist", "durable"},
    {"kernels"},
    {"models", "data"},
    {"objective", "metrics", "optim", "trackers", "plots"},
    {"evaluate", "report"},
    {"predict"},
    {"engine"},
    {"trainer", "weights"},
    {"train", "torchrun"},
]
# Which top-level packages of third parties each part of video_ens may import.
HEAVY_HOME = {
    "deepspeed": {"engine"},
    "triton": {"kernels"},
    "webdataset": {"data"},
    "av": {"data"},
    "decord": {"data"},
    "torchcodec": {"data"},
    "torchvision": set(),  # a test-only dependency: models/importers.py maps its state dicts without importing it
    "matplotlib": {"plots"},
    "wandb": {"trackers"},
    "mlflow": {"trackers"},
}


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" else "__init__"


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"video_ens/{unit} is not in the layer table of tests/unit/test_layering.py: add it")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    pkg_parts = path.relative_to(PKG.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ((node.module,) if node.module else ()))
                if not node.module:
                    for a in node.names:
                        yield f"{mod}.{a.name}"
                    continue
                yield mod
            else:
                yield node.module


def _package_files():
    return [p for p in PKG.rglob("*.py") if _unit(p) != "__init__"]


def test_imports_flow_one_way():
    problems = []
    for path in _package_files():
        unit = _unit(path)
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] != "video_ens" or len(parts) < 2:
                continue
            other = parts[1]
            if other == unit:
                continue
            if _layer(other) >= _layer(unit):
                problems.append(f"{path.relative_to(PKG.parent)} imports {mod} ({other} is not below {unit})")
    assert not problems, "\n".join(problems)


def test_heavy_dependencies_have_one_home():
    problems = []
    for path in _package_files():
        unit = _unit(path)
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top in HEAVY_HOME and unit not in HEAVY_HOME[top]:
                problems.append(f"{path.relative_to(PKG.parent)} imports {top}; only {HEAVY_HOME[top]} may")
    assert not problems, "\n".join(problems)


def test_models_objective_metrics_import_without_heavy_dependencies():
    """With DeepSpeed, Triton, WebDataset and every decoder made unimportable, the model code still builds and runs."""
    code = textwrap.dedent(
        """
        import sys
        BLOCKED = {"deepspeed", "triton", "webdataset", "av", "decord", "torchcodec", "torchvision"}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is blocked for this test")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import video_ens.config, video_ens.objective, video_ens.metrics, video_ens.kernels, video_ens.data
        import video_ens.models.importers
        from video_ens.models import MODELS, create_model
        for name in MODELS:
            with torch.device("meta"):
                create_model(name)
        # and the tiny ones run a forward pass, kernels="auto" included (the reference on CPU, with triton blocked)
        for name in ("s3dg_tiny_ens2", "dbof_tiny_ens2", "resnet_tiny_ens2"):
            kw = {"kernels": "auto"} if name != "resnet_tiny_ens2" else {"image_size": 32}
            model = create_model(name, **kw).eval()
            spec = model.input_spec
            if spec["kind"] == "clip":
                out = model(torch.randn(1, 3, 8, 32, 32))
            elif spec["kind"] == "features":
                out = model(torch.randn(2, 5, spec["dim"]), lengths=torch.tensor([5, 3]))
            else:
                out = model(torch.randn(1, 3, 32, 32))
            assert torch.isfinite(out.ensemble).all(), name
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok", len(MODELS))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


@pytest.mark.parametrize("name", ["deepspeed", "triton"])
def test_table_lists_real_homes(name):
    # the homes named in HEAVY_HOME are parts of the layer table (guards against typos in this file)
    for unit in HEAVY_HOME[name]:
        _layer(unit)

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
    {"dist", "durable", "typed_json", "cli"},
    {"model_options"},
    {"sections"},
    {"config"},
    {"kernels"},
    {"models", "data", "starter_ap", "view_sums"},
    {"objective", "metrics", "optim", "trackers", "plots", "progress"},
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


# tools/ and benchmarks/ are command lines over the package's public names (style.md); they are never imported by it.
ROOT = PKG.parent
SCRIPTS = sorted([*(ROOT / "tools").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
DECODERS = {"av", "decord", "torchcodec"}  # video decoders and encoders live in video_ens/data/ only


def _private_uses(path: Path) -> list[str]:
    """`from video_ens... import _x`, private modules of video_ens, and `module._x` on a name bound to video_ens."""
    tree = ast.parse(path.read_text())
    bound: set[str] = set()  # local names of video_ens modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "video_ens":
                    bound.add(a.asname or a.name.split(".")[0])
                    if any(p.startswith("_") for p in a.name.split(".")[1:]):
                        found.append(f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "video_ens":
            if any(p.startswith("_") for p in node.module.split(".")[1:]):
                found.append(f"from {node.module} import ...")
            for a in node.names:
                if a.name.startswith("_"):
                    found.append(f"from {node.module} import {a.name}")
                else:
                    bound.add(a.asname or a.name)  # may be a module (from video_ens.data import demo)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return found


def _is_sys_path(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and (node.value.id == "sys")
    )


def _sys_path_edits(path: Path) -> list[str]:
    """sys.path.insert/append/... calls, assignments to sys.path or a slice of it, site.addsitedir."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, attr = node.func.value, node.func.attr
            if _is_sys_path(owner) and attr in {"insert", "append", "extend", "remove", "pop", "clear"}:
                found.append(f"sys.path.{attr} (line {node.lineno})")
            elif isinstance(owner, ast.Name) and owner.id == "site" and attr == "addsitedir":
                found.append(f"site.addsitedir (line {node.lineno})")
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_is_sys_path(t) or isinstance(t, ast.Subscript) and _is_sys_path(t.value) for t in targets):
                found.append(f"sys.path assigned (line {node.lineno})")
    return found


def _script_imports(path: Path) -> list[str]:
    """Absolute imports of a script (scripts have no package, so no relative imports)."""
    mods = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            mods.append(node.module)
    return mods


def _script_import_problems(path: Path, tool_names: set[str]) -> list[str]:
    problems = []
    for mod in _script_imports(path):
        top = mod.split(".")[0]
        if top in DECODERS:
            problems.append(f"imports {top}: only video_ens/data/ may")
        if top in tool_names:
            problems.append(f"imports the script tools/{top}.py: use its library module")
    return problems


def test_scripts_use_public_names_only():
    problems = [f"{p.relative_to(ROOT)}: {use}" for p in SCRIPTS for use in _private_uses(p)]
    assert not problems, "\n".join(problems)


def test_no_sys_path_edits_in_package_tools_and_benchmarks():
    """Scripts import the installed package; converters and the demo generator are library modules, not scripts."""
    files = [*_package_files(), *PKG.glob("__init__.py"), *SCRIPTS]
    problems = [f"{p.relative_to(ROOT)}: {edit}" for p in files for edit in _sys_path_edits(p)]
    assert not problems, "\n".join(problems)


def test_scripts_import_no_decoder_and_no_other_script():
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    problems = [f"{p.relative_to(ROOT)}: {x}" for p in SCRIPTS for x in _script_import_problems(p, tools)]
    assert not problems, "\n".join(problems)


def test_package_never_imports_scripts():
    script_names = {p.stem for p in SCRIPTS} | {"tools", "benchmarks"}
    problems = [
        f"{p.relative_to(ROOT)} imports {mod}"
        for p in _package_files()
        for mod in _imports(p)
        if (mod or "").split(".")[0] in script_names
    ]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_forbid(tmp_path):
    """Each check above flags a file that breaks its rule (so an empty result means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import sys\nimport av\nfrom video_ens.data import demo\nfrom video_ens.data.writer import _one_at_a_time\n"
        "sys.path.insert(0, 'tools')\nsys.path = []\ndemo._up_to_date('x')\nimport make_demo_data\n"
    )
    assert _private_uses(bad) == [
        "from video_ens.data.writer import _one_at_a_time",
        "demo._up_to_date (line 7)",
    ]
    assert sorted(_sys_path_edits(bad)) == ["sys.path assigned (line 6)", "sys.path.insert (line 5)"]
    assert _script_import_problems(bad, {"make_demo_data"}) == [
        "imports av: only video_ens/data/ may",
        "imports the script tools/make_demo_data.py: use its library module",
    ]

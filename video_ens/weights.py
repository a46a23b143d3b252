"""Start a model from saved weights (recipe `model.init_from`, `model.init_exclude`), and write weights files.

    report = init_model(model, "runs/k400_s3dg_baseline", exclude=["branches.*.Logits.conv.*"])
    LOG.info(report.summary())   # loaded / excluded / newly initialised tensors per part: base, branch 0, ...

A source is a safetensors file (a run's model.safetensors, or what tools/import_weights.py writes), a run folder (its
model.safetensors, else its newest complete checkpoint) or a DeepSpeed checkpoint folder
(RUN/checkpoints/step_NNNNNNNNN, read by video_ens.engine.checkpoint_weights).

How tensors are matched. Every name is split into its part and its name within the network: `base.Mixed_3b.x` is
(base, Mixed_3b.x), `branches.1.Logits.conv.bias` is (branch 1, Logits.conv.bias); layer names do not depend on
where the fork is. A model tensor takes, in this order:
  * in the base: the source's base tensor of that name; else, when the source has one branch and its fork sits
    lower (the layer is in its branch), that branch's;
  * in branch i: the source's branch i; else, when the source has one branch (a baseline), its branch 0: every
    branch of a multi-headed model starts from the baseline's upper layers; else, when the source's fork sits
    higher (the layer is shared there), the source's base tensor.
A name that sits in both the base and the branches of the source (DBoF's `context_gate.*`: one gate on the frames,
one on the hidden layer) is only taken from its own part. Strict: a model tensor matched by no source tensor, or by
one of another shape, is an error that lists them, unless a glob pattern of `exclude` names it (fnmatch over the
model's names, `*` also crosses dots); excluded tensors keep the builder's initialisation. Narrower branches
(width_ratio < 1) have no tensor of the baseline's shape: they are refused, and `exclude=["branches.*"]` starts them
fresh on top of the baseline's base. Channels are not sliced: a subset of a trained layer's channels is not a trained
narrower layer. Source tensors nothing reads (a two-branch source into one branch) are reported, not an error.

A baseline copied into every branch gives identical branches, which stay identical while nothing random tells them
apart (no dropout): the report warns, and excluding each branch's classifier breaks the symmetry.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import durable, engine
from .config import MODEL_FIELDS, RecipeError
from .models import importers

_PART = re.compile(r"^(?:base|branches\.(\d+))\.(.+)$")
MAX_LISTED = 20  # names listed per kind in an error; the count is always given


def split_name(name: str) -> tuple[int | None, str] | None:
    """(None, rest) for "base.rest", (i, rest) for "branches.i.rest", None for a name outside both parts."""
    m = _PART.match(name)
    if m is None:
        return None
    return (int(m[1]) if m[1] is not None else None), m[2]


def part_of(name: str) -> str:
    """ "base", "branch i", or the name's first component for a tensor outside both."""
    key = split_name(name)
    if key is None:
        return name.split(".", 1)[0]
    return "base" if key[0] is None else f"branch {key[0]}"


# --------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class WeightsSource:
    """What `model.init_from` names, resolved."""

    path: Path
    """The safetensors file or checkpoint folder that is read."""
    kind: str
    """"safetensors" or "checkpoint" (a DeepSpeed checkpoint folder)."""
    description: str
    """For the log: the path, and for a run folder which of its files."""


def resolve_source(source: str | Path) -> WeightsSource:
    """The file or checkpoint folder `source` stands for (RecipeError naming model.init_from when there is none)."""
    path = Path(source)
    if path.is_file():
        return WeightsSource(path, "safetensors", str(path))
    if not path.is_dir():
        raise RecipeError(
            f"model.init_from: {path}: no such file or folder (give a model.safetensors, a run folder "
            "or a checkpoint folder RUN/checkpoints/step_NNNNNNNNN)"
        )
    if (path / "complete.json").is_file() or path.name.startswith("step_"):
        if not (path / "complete.json").is_file():
            raise RecipeError(
                f"model.init_from: {path} is not a complete checkpoint (no complete.json: a save that "
                "did not finish); name a complete one, or the run folder"
            )
        return WeightsSource(path, "checkpoint", f"{path} (DeepSpeed checkpoint)")
    if (path / "model.safetensors").is_file():
        return WeightsSource(
            path / "model.safetensors",
            "safetensors",
            f"{path / 'model.safetensors'} (the final weights of run folder {path})",
        )
    latest = engine.latest_checkpoint(path / "checkpoints")
    if latest is not None:
        return WeightsSource(
            latest[1],
            "checkpoint",
            f"{latest[1]} (the newest checkpoint of run folder {path}, which has no model.safetensors)",
        )
    raise RecipeError(
        f"model.init_from: {path} is a folder with neither a model.safetensors nor a complete "
        "checkpoint under checkpoints/: name a weights file, a run folder or a checkpoint folder"
    )


def _not_safetensors(path: Path, error: Exception) -> RecipeError:
    return RecipeError(
        f"model.init_from: {path} is not a safetensors file ({str(error).splitlines()[0][:120]}): init_from reads "
        "safetensors only (a pickled .pth can run code when loaded); convert torchvision or timm files with "
        "tools/import_weights.py"
    )


def read_shapes(source: WeightsSource) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape; for a safetensors file from its header alone (nothing else is read)."""
    if source.kind == "checkpoint":
        return {k: tuple(v.shape) for k, v in engine.checkpoint_weights(source.path).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(source.path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise _not_safetensors(source.path, e) from None


def read_weights(source: str | Path | WeightsSource) -> tuple[dict[str, torch.Tensor], WeightsSource]:
    """All tensors of a source (on the CPU) and the source resolved."""
    src = source if isinstance(source, WeightsSource) else resolve_source(source)
    if src.kind == "checkpoint":
        return engine.checkpoint_weights(src.path), src
    from safetensors.torch import load_file

    try:
        return load_file(str(src.path), device="cpu"), src
    except Exception as e:
        raise _not_safetensors(src.path, e) from None


def save_weights(path: str | Path, state: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None) -> None:
    """Write `state` as a safetensors file, whole or not at all (video_ens.durable.write_atomic). Serialised in
    memory (one more copy of the weights, 4 bytes per fp32 parameter) rather than with save_file, whose errors name
    no path."""
    from safetensors.torch import save

    blob = save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, metadata=metadata)
    durable.write_atomic(Path(path), blob)


# --------------------------------------------------------------------------------------------------- matching


@dataclass
class InitPlan:
    """Which source tensor each model tensor takes (see the module docstring for the rule)."""

    pairs: dict[str, str] = field(default_factory=dict)
    """model name -> source name, for every tensor that is loaded."""
    excluded: list[str] = field(default_factory=list)
    """Model names matched by an exclude pattern: they keep the builder's initialisation."""
    skipped: dict[str, str] = field(default_factory=dict)
    """model name -> source name, for excluded tensors the source holds (not read)."""
    missing: list[str] = field(default_factory=list)
    """Model names no source tensor matches, each with the reason."""
    mismatched: list[str] = field(default_factory=list)
    """"model name (shape) <- source name (shape)" for matches of another shape."""
    unused: list[str] = field(default_factory=list)
    """Source names that no model tensor reads."""


def _check_patterns(model_names, exclude) -> None:
    for i, pattern in enumerate(exclude):
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(f"model.init_exclude[{i}]: expected a non-empty glob pattern, got {pattern!r}")
        if not any(fnmatch.fnmatchcase(n, pattern) for n in model_names):
            example = next(iter(model_names), "base.x.weight")
            raise RecipeError(
                f"model.init_exclude[{i}]: {pattern!r} matches no tensor of the model (names look like {example!r}; "
                "'*' matches any characters, dots included): fix or remove it"
            )


def plan_init(
    model_shapes: dict[str, tuple[int, ...]], source_shapes: dict[str, tuple[int, ...]], exclude=()
) -> InitPlan:
    """Match model tensors to source tensors by the module docstring's rule; nothing is read or changed."""
    exclude = list(exclude)
    _check_patterns(model_shapes, exclude)
    src_base, src_branch = {}, {}  # rest -> source name; (branch, rest) -> source name
    for name in source_shapes:
        key = split_name(name)
        if key is None:
            continue
        if key[0] is None:
            src_base[key[1]] = name
        else:
            src_branch[key] = name
    branch_rests = {rest for _, rest in src_branch}
    source_branches = sorted({b for b, _ in src_branch})
    one_branch = source_branches == [0]

    def find(name: str) -> tuple[str | None, str]:
        key = split_name(name)
        if key is None:
            return (name, "") if name in source_shapes else (None, "the source has no tensor of this name")
        branch, rest = key
        if branch is None:
            if rest in src_base:
                return src_base[rest], ""
            if one_branch and (0, rest) in src_branch:
                return src_branch[0, rest], ""
            if rest in branch_rests:
                return None, f"the source has it in each of its {len(source_branches)} branches, none shared"
            return None, "not in the source"
        if (branch, rest) in src_branch:
            return src_branch[branch, rest], ""
        if one_branch and (0, rest) in src_branch:
            return src_branch[0, rest], ""
        if rest in src_base and rest not in branch_rests:
            return src_base[rest], ""
        if source_branches and rest in branch_rests:
            return None, f"the source has {len(source_branches)} branch(es), not branch {branch}"
        return None, "not in the source"

    plan = InitPlan()
    read = set()
    for name, shape in model_shapes.items():
        src, why = find(name)
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            plan.excluded.append(name)
            if src is not None:
                plan.skipped[name] = src
                read.add(src)
        elif src is None:
            plan.missing.append(f"{name} ({why})")
        elif tuple(source_shapes[src]) != tuple(shape):
            plan.mismatched.append(f"{name} {tuple(shape)} <- {src} {tuple(source_shapes[src])}")
            read.add(src)
        else:
            plan.pairs[name] = src
            read.add(src)
    plan.unused = [n for n in source_shapes if n not in read]
    return plan


def _suggest(names: list[str]) -> list[str]:
    """A few init_exclude patterns covering `names` (branch indices as '*'), coarser until there are at most 6."""
    generic = [re.sub(r"^branches\.\d+\.", "branches.*.", n.split(" ", 1)[0]) for n in names]
    for depth in (None, 2, 1, 0):
        patterns = []
        for n in generic:
            parts = n.split(".")[:-1]  # the module path
            head = 2 if parts[:1] == ["branches"] else 1
            keep = parts if depth is None else parts[: head + depth]
            pattern = ".".join(keep) + ".*"
            if pattern not in patterns:
                patterns.append(pattern)
        if len(patterns) <= 6:
            return patterns
    return patterns


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {len(items)} {title}: " + "; ".join(items[:MAX_LISTED]) + more


def check_plan(plan: InitPlan, description: str) -> None:
    """RecipeError listing every model tensor the plan cannot load (missing or of another shape)."""
    if not plan.missing and not plan.mismatched:
        return
    lines = [f"model.init_from: {description} does not fit the model:"]
    if plan.mismatched:
        lines.append(_listing("tensor(s) of another shape (model <- source)", plan.mismatched))
    if plan.missing:
        lines.append(_listing("tensor(s) the source does not hold", plan.missing))
    patterns = _suggest(plan.mismatched + plan.missing)
    narrower = len(plan.mismatched) > 2 and all(p.startswith("branches.") for p in patterns)
    lines.append(
        f"Keep these at their fresh initialisation with model.init_exclude (glob patterns over the model's names), "
        f"e.g. {json.dumps(patterns)}, or build the model the weights were saved from (model.num_classes, "
        "width_ratio, num_branches, options)"
        + (". Narrower branches never fit a baseline's: exclude 'branches.*' to take only its base" if narrower else "")
    )
    raise RecipeError("\n".join(lines))


# --------------------------------------------------------------------------------------------------- the report


@dataclass
class InitReport:
    """What init_model did, per part of the model (base, branch 0, ...)."""

    source: WeightsSource
    exclude: tuple[str, ...]
    parts: dict[str, dict[str, int]]
    """part -> {"tensors", "loaded", "loaded_values", "excluded", "new", "new_values"}. "excluded": source tensors
    that init_exclude kept out; "new": model tensors that keep the builder's initialisation."""
    branch_sources: dict[str, list[str]]
    """part -> the source parts its tensors came from, e.g. {"branch 1": ["branch 0"]}."""
    unused: list[str]
    identical_branches: list[list[int]]
    """Groups of branches loaded entirely from the same source tensors: they start identical."""

    def warnings(self) -> list[str]:
        out = []
        if self.unused:
            out.append(
                f"{len(self.unused)} tensor(s) of {self.source.path} were not used (the model has no place "
                f"for them), e.g. {', '.join(self.unused[:3])}"
            )
        for group in self.identical_branches:
            out.append(
                f"branches {', '.join(map(str, group))} start from the same weights (a one-branch source): they stay "
                "identical while nothing random tells them apart (dropout 0 gives them the same gradients), so the "
                "ensemble is one network; exclude a part of each branch (e.g. its classifier: "
                "'branches.*.fc.*', 'branches.*.Logits.conv.*', 'branches.*.moe.*') to start them apart"
            )
        return out

    def summary(self) -> str:
        rows = [
            f"initialised from {self.source.description}"
            + (f", init_exclude {json.dumps(list(self.exclude))}" if self.exclude else "")
        ]
        rows.append(f"  {'part':<10} {'tensors':>8} {'loaded':>8} {'values':>14} {'excluded':>9} {'new':>6}  from")
        for part, c in self.parts.items():
            origin = ", ".join(self.branch_sources.get(part, [])) or "-"
            rows.append(
                f"  {part:<10} {c['tensors']:>8} {c['loaded']:>8} {c['loaded_values']:>14,} "
                f"{c['excluded']:>9} {c['new']:>6}  {origin}"
            )
        return "\n".join(rows)

    def record(self) -> dict:
        """The metrics.jsonl "init" line's values."""
        return {
            "source": str(self.source.path),
            "source_kind": self.source.kind,
            "exclude": list(self.exclude),
            "parts": self.parts,
            "from": self.branch_sources,
            "unused": len(self.unused),
            "identical_branches": self.identical_branches,
        }


def _report(plan: InitPlan, model_shapes: dict[str, tuple[int, ...]], source: WeightsSource, exclude) -> InitReport:
    parts: dict[str, dict[str, int]] = {}
    origins: dict[str, list[str]] = {}
    for name, shape in model_shapes.items():
        c = parts.setdefault(part_of(name), dict(tensors=0, loaded=0, loaded_values=0, excluded=0, new=0, new_values=0))
        c["tensors"] += 1
        numel = int(torch.Size(shape).numel())
        if name in plan.pairs:
            c["loaded"] += 1
            c["loaded_values"] += numel
            origin = part_of(plan.pairs[name])
            if origin not in origins.setdefault(part_of(name), []):
                origins[part_of(name)].append(origin)
        else:
            c["new"] += 1
            c["new_values"] += numel
            c["excluded"] += name in plan.skipped
    # branches whose every tensor was loaded, from the same source names
    by_source: dict[tuple, list[int]] = {}
    per_branch: dict[int, list[tuple[str, str]]] = {}
    for name, src in plan.pairs.items():
        key = split_name(name)
        if key is not None and key[0] is not None:
            per_branch.setdefault(key[0], []).append((key[1], src))
    for branch, items in sorted(per_branch.items()):
        if parts[f"branch {branch}"]["new"] == 0:
            by_source.setdefault(tuple(sorted(items)), []).append(branch)
    identical = [group for group in by_source.values() if len(group) > 1]
    return InitReport(source, tuple(exclude), parts, origins, plan.unused, identical)


def init_model(model: nn.Module, source: str | Path, *, exclude=()) -> InitReport:
    """Load `source` into `model` (on the CPU or its device) by the matching rule; RecipeError, changing nothing,
    when a tensor that is not excluded has no source tensor of its shape."""
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    src = resolve_source(source)
    _check_patterns(model_shapes, list(exclude))
    state, src = read_weights(src)
    plan = plan_init(model_shapes, {k: tuple(v.shape) for k, v in state.items()}, exclude)
    check_plan(plan, src.description)
    own = model.state_dict()  # tensors that share storage with the parameters and buffers
    with torch.no_grad():
        for name, src_name in plan.pairs.items():
            own[name].copy_(state[src_name])
    return _report(plan, model_shapes, src, exclude)


def check_init(model: nn.Module, source: str | Path, *, exclude=()) -> InitReport:
    """What init_model would do, from shapes alone (the model may live on the meta device; a safetensors source is
    read only up to its header): RecipeError as init_model raises it. Loads nothing."""
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    src = resolve_source(source)
    plan = plan_init(model_shapes, read_shapes(src), exclude)
    check_plan(plan, src.description)
    return _report(plan, model_shapes, src, exclude)


# --------------------------------------------------------------------------------------------------- importing


def load_public_state_dict(
    arch: str, *, weights: str | None = None, path: str | Path | None = None, progress: bool = True
) -> tuple[dict[str, torch.Tensor], str]:
    """A public state dict and where it came from: torchvision's published `weights` for `arch` (downloaded once
    into torch.hub's cache, its SHA-256 prefix checked), or a local file `path` (.safetensors, or a .pth/.bin read
    with weights_only=True: tensors only, no code runs)."""
    if (weights is None) == (path is None):
        raise ValueError("give either weights (a torchvision weights name) or path (a local state dict file)")
    if weights is not None:
        known = importers.TORCHVISION_WEIGHTS.get(arch, {})
        if weights not in known:
            raise ValueError(f"unknown weights {weights!r} for {arch}: torchvision publishes {', '.join(known)}")
        url = known[weights]
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=progress, check_hash=True, weights_only=True
        )
        return state, f"torchvision {arch} {weights} ({url})"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such state dict file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError (or a RuntimeError wrapping it)
            raise ValueError(
                f"{path}: refused to load: it holds objects other than tensors ({str(e).splitlines()[0][:160]})"
            ) from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (a dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel / DDP
    return state, str(path)


def import_pretrained(
    arch: str, out: str | Path, *, weights: str | None = None, path: str | Path | None = None, progress: bool = True
) -> importers.Imported:
    """Map a public `arch` state dict ("resnet152", "s3d") to video_ens names and write it to `out` (safetensors,
    metadata: the model, its origin, the build keywords, the exclusions it needs)."""
    if arch not in importers.IMPORTERS:
        raise ValueError(f"unknown architecture {arch!r}: importers exist for {', '.join(importers.IMPORTERS)}")
    state, origin = load_public_state_dict(arch, weights=weights, path=path, progress=progress)
    imported = importers.IMPORTERS[arch](state)
    metadata = {
        "model": imported.model,
        "imported_from": origin,
        "build": json.dumps(imported.build),
        "init_exclude": json.dumps(list(imported.exclude)),
    }
    save_weights(out, imported.state, metadata=metadata)
    return imported


def recipe_model_section(imported: importers.Imported, weights_path: str | Path) -> dict:
    """The recipe's "model" section that builds the imported network and loads it."""
    section: dict = {"name": imported.model}
    options = {}
    for key, value in imported.build.items():
        target = section if key in MODEL_FIELDS else options
        target[key] = list(value) if isinstance(value, tuple) else value
    if options:
        section["options"] = options
    section["init_from"] = str(weights_path)
    if imported.exclude:
        section["init_exclude"] = list(imported.exclude)
    return section

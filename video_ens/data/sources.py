"""What data.train_shards and data.val_shards point at: the shard list of each (a dataset folder and its
`_info.json`, a brace pattern of local shards, or `pipe:` commands and http(s) URLs with their `_info.json` fetched
beside them), and whether the dataset suits the model.

    paths = resolve_paths(recipe.data)                       # RecipeError naming the field and the fix
    check_compatible(recipe.data, recipe.model.name, model.input_spec)
    listed = list_shards(paths.train, "train_shards", recipe.data)   # .shards, .counts, .info
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from video_ens.config import RecipeError
from video_ens.data import remote, schema

__all__ = [
    "DataPaths", "ShardList", "check_compatible", "label_names", "list_shards", "metrics_task", "resolve_paths",
]  # fmt: skip

# data.kind -> the schema kind of the dataset folder that feeds it.
SCHEMA_KIND = {"clip": "video", "features": "yt8m", "image": "image"}


@dataclass(frozen=True)
class DataPaths:
    """data.train_shards and data.val_shards (None: no evaluation) as the recipe gives them: a dataset folder, a
    brace pattern of local shards (training only), or a `pipe:` command or http(s) URL (see `resolve_paths`)."""

    train: str
    val: str | None

    def __post_init__(self) -> None:  # Path objects are welcome; a URL must stay a string ("https://" would lose a /)
        object.__setattr__(self, "train", os.fspath(self.train))
        if self.val is not None:
            object.__setattr__(self, "val", os.fspath(self.val))


def metrics_task(data_cfg) -> str:
    """ "multi_label" for YouTube-8M frame features, "single_label" for clips and images."""
    return "multi_label" if data_cfg.kind == "features" else "single_label"


def _is_pattern(text: str) -> bool:
    return "{" in text and ".." in text


def _check_kind(info: schema.DatasetInfo, where: str, field_name: str, kind: str) -> schema.DatasetInfo:
    if info.kind != SCHEMA_KIND[kind]:
        raise RecipeError(
            f"data.{field_name}: {where} holds a {info.kind!r} dataset but data.kind is {kind!r}, which reads "
            f"{SCHEMA_KIND[kind]!r} shards: point it at a {SCHEMA_KIND[kind]} dataset or change data.kind"
        )
    return info


def _info_or_error(folder: str | Path, field_name: str, kind: str) -> schema.DatasetInfo:
    try:
        info = schema.read_info(folder)
    except (FileNotFoundError, ValueError) as e:
        raise RecipeError(f"data.{field_name}: {e}") from None
    return _check_kind(info, str(folder), field_name, kind)


@dataclass(frozen=True)
class ShardList:
    """The shards of data.train_shards or data.val_shards in order, with what their _info.json says (if read)."""

    shards: tuple[str, ...]
    counts: tuple[int, ...] | None  # samples per shard; None when no _info.json lists them
    info: schema.DatasetInfo | None


# _info.json files fetched from remote sources in this process, by URL: the launch check, the training and the
# evaluation stream each list the shards, and a `pipe:aws s3 cp` costs about a second of CLI start-up per fetch.
_REMOTE_INFO: dict[str, schema.DatasetInfo] = {}


def _remote_info(url: str, field_name: str, data_cfg) -> schema.DatasetInfo:
    """The _info.json at `url` (RecipeError when it is malformed or of another kind; RemoteError when unreadable)."""
    if url not in _REMOTE_INFO:
        raw = remote.fetch(url, timeout_s=data_cfg.read_timeout_s)
        try:
            info = schema.DatasetInfo.from_json(raw.decode("utf-8", "replace"), where=remote.describe(url))
        except ValueError as e:
            raise RecipeError(f"data.{field_name}: {e}") from None
        _REMOTE_INFO[url] = _check_kind(info, remote.describe(url), field_name, data_cfg.kind)
    return _REMOTE_INFO[url]


def list_shards(text: str, field_name: str, data_cfg) -> ShardList:
    """The shard list of one recipe field (see `resolve_paths`); RecipeError naming the field and the fix."""
    evaluation = field_name == "val_shards"
    if remote.is_remote(text):
        return _list_remote(text, field_name, data_cfg, evaluation)
    if _is_pattern(text):
        if evaluation:
            raise RecipeError(
                f"data.val_shards: {text!r} is a brace pattern of local shards; evaluation needs a dataset folder "
                "with _info.json (its per-shard counts let each rank take a disjoint share): name the folder"
            )
        if data_cfg.samples_per_epoch is None:
            raise RecipeError(
                f"data.samples_per_epoch: required when data.train_shards is a brace pattern ({text!r}), "
                "which has no _info.json to give the dataset size; set it, or point train_shards at the folder"
            )
        shards = remote.expand(text)
        missing = [p for p in shards if not os.path.isfile(p)]
        if missing:
            raise RecipeError(f"data.train_shards: {len(missing)} shard(s) of {text!r} do not exist, e.g. {missing[0]}")
        return ShardList(tuple(shards), None, None)
    info = _info_or_error(text, field_name, data_cfg.kind)
    return ShardList(tuple(os.path.join(text, s.name) for s in info.shards), tuple(s.count for s in info.shards), info)


def _list_remote(text: str, field_name: str, data_cfg, evaluation: bool) -> ShardList:
    """Shards behind `pipe:` commands or http(s) URLs, and their _info.json, read the same way from their folder.

    A URL ending in "/" is a dataset folder: its _info.json names the shards. Otherwise the text (a brace pattern
    or one shard) names them and _info.json gives their counts by file name. Training may do without it when
    data.samples_per_epoch is set; evaluation cannot (its rank split needs the counts)."""
    field = f"data.{field_name}"
    info, why = None, "its shards lie in more than one folder, so no one _info.json describes them"
    if text.endswith("/") and not text.startswith("pipe:"):
        shards, info_url = None, text + schema.INFO_NAME
    else:
        shards = remote.expand(text)
        try:
            folders = {remote.sibling(s, schema.INFO_NAME) for s in shards}
        except ValueError as e:  # a command in which no one word names the shard
            if evaluation or data_cfg.samples_per_epoch is None:
                raise RecipeError(f"{field}: {e}") from None
            folders, why = set(), str(e)
        info_url = folders.pop() if len(folders) == 1 else None
    optional = not evaluation and shards is not None and data_cfg.samples_per_epoch is not None
    if info_url is not None:
        try:
            info = _remote_info(info_url, field_name, data_cfg)
        except remote.RemoteError as e:
            why = str(e)
    if info is None:
        if optional:
            return ShardList(tuple(shards), None, None)
        need = (
            "evaluation gives each rank its share by the per-shard sample counts of the dataset's _info.json"
            if evaluation
            else "a remote training set takes its size and label map from the dataset's _info.json"
        )
        fix = "put the converter's _info.json beside the shards"
        if not evaluation:  # a folder URL names no shards: without its _info.json they must be named
            fix += ", or set data.samples_per_epoch" + (
                " and name the shards (a brace pattern)" if shards is None else ""
            )
        raise RecipeError(f"{field}: no _info.json for {text!r} ({why}): {need}; {fix}")
    by_name = {s.name: s.count for s in info.shards}
    if shards is None:
        shards = [text + urllib.parse.quote(s.name) for s in info.shards]
        return ShardList(tuple(shards), tuple(s.count for s in info.shards), info)
    names = [remote.shard_name(s) for s in shards]
    unlisted = [n for n in names if n not in by_name]
    if unlisted and not optional:
        raise RecipeError(
            f"{field}: {len(unlisted)} shard(s) of {text!r} are not listed in {remote.describe(info_url)}, e.g. "
            f"{unlisted[0]}: name shards of that dataset" + ("" if evaluation else ", or set data.samples_per_epoch")
        )
    counts = None if unlisted else tuple(by_name[n] for n in names)
    return ShardList(tuple(shards), counts, info)


def label_names(data_cfg) -> tuple[list[str] | None, str]:
    """(class names, where from) of the label map the recipe's labels index: data.train_shards' dataset (for a
    local brace pattern, its folder's _info.json if it has one), else data.val_shards' (remote ones fetched as the
    streams fetch them); (None, "") when neither can be read here or names its classes (YouTube-8M)."""
    for field_name in ("train_shards", "val_shards"):
        text = getattr(data_cfg, field_name)
        if not text:
            continue
        try:
            info = list_shards(text, field_name, data_cfg).info
            if info is None and _is_pattern(text) and not remote.is_remote(text):
                info = schema.read_info(os.path.dirname(text))
        except (RecipeError, OSError, ValueError):  # not here (another machine's dataset), unreadable, malformed
            continue
        if info is not None and info.label_names:
            return list(info.label_names), f"data.{field_name} ({text})"
    return None, ""


def resolve_paths(data_cfg) -> DataPaths:
    """Check data.train_shards and data.val_shards (RecipeError naming the field and the fix) and return them.

    Either field may be a local dataset folder with _info.json, or remote: a `pipe:` command that writes a shard to
    its standard output ("pipe:aws s3 cp s3://bucket/k400/train-{000000..000999}.tar -") or an http(s) URL, each a
    brace pattern or one shard, with the dataset's _info.json read the same way from the shards' folder; an http(s)
    URL ending in "/" names a dataset folder whose _info.json lists the shards. train_shards may also be a brace
    pattern of local shards ("dir/train-{000000..000099}.tar"), which reads no _info.json. Where training has no
    _info.json for its size, data.samples_per_epoch must be set. Evaluation always needs one: its per-shard counts
    give every sample to exactly one rank. val_shards "" means no evaluation.
    """
    train_text = data_cfg.train_shards
    if not train_text:
        raise RecipeError(
            "data.train_shards: is empty; name a dataset folder (demo recipes: data/demo/<kind>/train, made by launch.sh)"
        )
    list_shards(train_text, "train_shards", data_cfg)
    val = data_cfg.val_shards or None
    if val is not None:
        list_shards(val, "val_shards", data_cfg)
    return DataPaths(train=train_text, val=val)


def check_compatible(data_cfg, model_name: str, input_spec: dict) -> None:
    """Raise RecipeError when the data recipe cannot feed this model; the message names the field and the fix."""
    kind = input_spec.get("kind")
    if kind not in SCHEMA_KIND:
        raise RecipeError(f"model.name: model {model_name} declares input kind {kind!r}, which no loader provides")
    if data_cfg.kind != kind:
        raise RecipeError(
            f"data.kind: {data_cfg.kind!r} data cannot feed model {model_name}, which takes {kind!r} input "
            f"({_describe_spec(input_spec)}); set data.kind to {kind!r} with a {SCHEMA_KIND[kind]} dataset, "
            f"or choose a model for {data_cfg.kind!r} data"
        )
    if kind == "clip":
        if data_cfg.frames != input_spec["frames"]:
            raise RecipeError(
                f"data.frames: {data_cfg.frames} frames but model {model_name} expects {input_spec['frames']} "
                f"per clip; set data.frames to {input_spec['frames']}"
            )
    if kind in ("clip", "image"):
        if data_cfg.crop_size != input_spec["size"]:
            raise RecipeError(
                f"data.crop_size: {data_cfg.crop_size} but model {model_name} expects {input_spec['size']} x "
                f"{input_spec['size']} inputs; set data.crop_size to {input_spec['size']}"
            )
    if kind == "features":
        dim = schema.YT8M_RGB_DIM + schema.YT8M_AUDIO_DIM
        if input_spec["dim"] != dim:
            raise RecipeError(
                f"model.options: model {model_name} expects {input_spec['dim']}-d frame features but YouTube-8M "
                f"shards hold {schema.YT8M_RGB_DIM} rgb + {schema.YT8M_AUDIO_DIM} audio = {dim}; set "
                f"rgb_dim={schema.YT8M_RGB_DIM}, audio_dim={schema.YT8M_AUDIO_DIM}"
            )
        if data_cfg.frames > input_spec["max_frames"]:
            raise RecipeError(
                f"data.frames: {data_cfg.frames} frames per training video exceeds model {model_name}'s "
                f"max_frames {input_spec['max_frames']}; set data.frames to at most {input_spec['max_frames']} "
                f"(the paper samples {input_spec.get('train_frames', 25)})"
            )


def _describe_spec(spec: dict) -> str:
    if spec["kind"] == "clip":
        return f"clips of {spec['frames']} frames at {spec['size']}x{spec['size']}"
    if spec["kind"] == "image":
        return f"{spec['size']}x{spec['size']} images"
    return f"{spec['dim']}-d frame features"

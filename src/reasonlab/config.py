"""Typed configs: a YAML file names its `method:` and loads into that method's dataclass.

    cfg = load_config("configs/markovian/gsm8k-llama3.1-8b.yaml", ["train.lr=1e-5", "model.lora.r=16"])

Every field has a default and a help line (`F(default, "help")`), so `--print-config` can show a commented YAML of the
resolved config. Errors a user can make (unknown key, wrong type, bad value) raise `ConfigError` with one line naming
the key, the file and the closest valid key; the CLI prints that line and exits 2.

A method module (`reasonlab/methods/<name>.py`) defines `Config(BaseConfig)`; it may subclass `TrainConfig` /
`EvalConfig` to add fields. The keys every method shares: `seed`, `train.steps`, `train.lr`, `eval.every`.
"""

from __future__ import annotations

from reasonlab.errors import UserError

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(UserError, ValueError):
    """A config problem the user can fix; its message is one line."""


def F(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002 (help reads best here)
    """A dataclass field with a help line. Pass a dataclass type (or list/dict) for a fresh default per instance."""
    meta = {"help": help}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=meta, **kwargs)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


Schedule = Literal["constant", "linear", "cosine"]
Precision = Literal["fp32", "bf16", "fp16"]
DEVICE_RE = r"auto|cpu|cuda(:\d+)?"


@dataclass
class TrainConfig:
    steps: int = F(100, "optimizer steps to train")
    lr: float = F(1e-4, "peak learning rate")
    batch_size: int = F(8, "examples per optimizer step (global, across processes)")
    weight_decay: float = F(0.0, "AdamW weight decay")
    grad_clip: float = F(1.0, "max global gradient norm; 0 disables clipping")
    warmup_steps: int = F(0, "linear warm-up steps before the schedule")
    schedule: Schedule = F("constant", "learning rate after warm-up: constant | linear (decay to min_lr_ratio) | "
                           "cosine (to min_lr_ratio)")
    min_lr_ratio: float = F(0.0, "linear/cosine: the final learning rate as a fraction of the peak")
    device: str = F("auto", "auto (CUDA when available) | cpu | cuda | cuda:N (one process; several processes take "
                    "one GPU each)")
    precision: Precision = F("fp32", "fp32 | bf16 (autocast) | fp16 (autocast + loss scaling, CUDA only)")
    gpus: int = F(0, "GPUs this config is sized for (0: a CPU config); on a machine without them the run warns at "
                  "start and in its report")
    gpu_memory_gb: int = F(0, "memory per GPU this config is sized for (0: any)")
    threads: int = F(0, "torch CPU threads per process (0: reasonlab run picks the free cores / processes)")
    log_every: int = F(1, "write train/* metrics every N steps")
    checkpoint_every: int = F(0, "save a checkpoint every N steps (0: only at the end and on stop)")
    keep_checkpoints: int = F(2, "how many step_N checkpoints to keep (newest); 'best' is kept separately")

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("train.steps must be >= 0")
        if self.lr < 0:
            raise ValueError("train.lr must be >= 0")
        if self.batch_size < 1:
            raise ValueError("train.batch_size must be >= 1")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("train.warmup_steps must be >= 0 and train.min_lr_ratio in [0, 1]")
        if not re.fullmatch(DEVICE_RE, self.device):
            close = difflib.get_close_matches(self.device, ["auto", "cpu", "cuda", "cuda:0"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"train.device must be auto | cpu | cuda | cuda:N, got {self.device!r}{hint}")
        if self.gpus < 0 or self.gpu_memory_gb < 0 or self.threads < 0:
            raise ValueError("train.gpus, train.gpu_memory_gb and train.threads must be >= 0")


@dataclass
class EvalConfig:
    every: int = F(0, "evaluate on validation every N steps (0: only before and after training; -1: after "
                       "training only)")
    limit: int = F(0, "validation examples per periodic eval (0: the whole split)")


@dataclass
class TrackingConfig:
    tensorboard: bool = F(True, "also write TensorBoard event files under <run>/tb")
    wandb: bool = F(False, "also log to Weights & Biases")
    wandb_project: str = F("reasonlab", "W&B project")
    wandb_mode: str = F("offline", "W&B mode: offline (sync later with `wandb sync`) | online | disabled")


@dataclass
class BaseConfig:
    method: str = F("", "which recipe runs this config (reasonlab/methods/<method>.py)")
    seed: int = F(0, "seed for model init, data order and sampling")
    train: TrainConfig = F(TrainConfig, "optimization")
    eval: EvalConfig = F(EvalConfig, "periodic evaluation")
    tracking: TrackingConfig = F(TrackingConfig, "where metrics go besides metrics.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# loading


def parse_overrides(items: typing.Iterable[str]) -> list[tuple[str, Any]]:
    """`a.b=1e-5` -> [("a.b", 1e-05)]; the value is read as YAML so lists/bools/null work (`x=[1,2]`, `y=null`)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.lr=1e-5)")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def _set_dotted(data: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: '{'.'.join(parts[: i + 1])}' is a value, not a section, so '{key}' is invalid")
        node = nxt
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (method:, train:, ...)")
    return data


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = (), *, method: str | None = None) -> BaseConfig:
    """YAML file (or nothing) + dotted overrides -> the method's typed config."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "command line"
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value, "command line")
    name = data.get("method", method)
    if not name:
        raise ConfigError(f"{source}: no 'method:' key; add e.g. 'method: markovian' (choices: {', '.join(_methods())})")
    from reasonlab.methods import get_method

    cls = get_method(str(name), source=source).Config
    data["method"] = name
    return from_dict(cls, data, source)


def _methods() -> list[str]:
    from reasonlab.methods import METHODS

    return sorted(METHODS)


def from_dict(cls: type, data: dict, source: str = "<dict>", prefix: str = "", root: type | None = None) -> Any:
    """Build dataclass `cls` from a (nested) dict, checking every key and type. `root` is the top-level class, so a
    misplaced key can be suggested from anywhere in the config ('eval.lr' -> 'train.lr')."""
    root = root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{full}'{_suggest(full, all_keys(root))}")
        kwargs[key] = _coerce(value, hints[key], full, source, root)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


def _suggest(key: str, candidates: list[str]) -> str:
    """Closest valid key: a near-identical path ('train.lrr'), else the same leaf elsewhere ('eval.lr' -> 'train.lr'),
    else a looser match on the path or the leaf."""
    leaf = key.rsplit(".", 1)[-1]
    best = (difflib.get_close_matches(key, candidates, n=1, cutoff=0.8)
            or [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:1]
            or difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
            or difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1] for c in candidates], n=1, cutoff=0.6))
    if best and best[0] not in candidates:  # a leaf match: show its full path
        best = [c for c in candidates if c.rsplit(".", 1)[-1] == best[0]][:1]
    return f" (did you mean '{best[0]}'?)" if best else ""


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts, sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        full = f"{prefix}{f.name}"
        keys.append(full)
        t = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(t):
            keys.extend(all_keys(t, full + "."))
    return keys


def _unwrap_optional(t):
    if get_origin(t) in (Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return t


def _tname(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _coerce(value: Any, t: Any, key: str, source: str, root: type) -> Any:
    def bad(expect: str):
        return ConfigError(f"{source}: '{key}' must be {expect}, got {type(value).__name__} {value!r}")

    origin = get_origin(t)
    if t is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(t)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source, root)
            except ConfigError:
                continue
        raise bad(" or ".join(_tname(a) for a in args))
    if origin is Literal:
        choices = get_args(t)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: '{key}' must be one of {list(choices)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(t):
        if dataclasses.is_dataclass(value):
            return value
        if value is None:
            raise bad("a mapping")
        return from_dict(t, value, source, key + ".", root)
    if origin in (list, tuple, typing.List, typing.Tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        args = get_args(t)
        if origin in (tuple, typing.Tuple) and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise bad(f"a list of {len(args)} items")
            return tuple(_coerce(v, a, f"{key}[{i}]", source, root) for i, (v, a) in enumerate(zip(value, args)))
        item_t = args[0] if args else Any
        items = [_coerce(v, item_t, f"{key}[{i}]", source, root) for i, v in enumerate(value)]
        return tuple(items) if origin in (tuple, typing.Tuple) else items
    if origin in (dict, typing.Dict) or t is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        args = get_args(t)
        if args:
            return {k: _coerce(v, args[1], f"{key}.{k}", source, root) for k, v in value.items()}
        return dict(value)
    if t is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if t is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    return value


# ----------------------------------------------------------------------------------------------------------------------
# output


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any, *, comments: bool = False) -> str:
    """The resolved config as YAML; with comments=True each key carries its help line."""
    if not comments:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False)
    lines: list[str] = []

    def emit(obj: Any, indent: int) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            pad = "  " * indent
            help_ = f.metadata.get("help", "")
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:{'  # ' + help_ if help_ else ''}")
                emit(value, indent + 1)
            else:
                dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=10**6).strip()
                dumped = dumped[1:-1] if dumped.startswith("{") else dumped
                lines.append(f"{pad}{dumped}{'  # ' + help_ if help_ else ''}")

    emit(cfg, 0)
    return "\n".join(lines) + "\n"


def check_help_lines(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys that lack a help line (a test asserts this is empty for every registered method)."""
    missing = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        if not f.metadata.get("help"):
            missing.append(full)
        t = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(t):
            missing.extend(check_help_lines(t, full + "."))
    return missing

"""YAML configs → nested dataclasses, with defaults, validation and `--set key=value` overrides.

A config schema is a tree of dataclasses. `load_config(path, Schema, overrides)` reads the
YAML file, applies the dotted overrides (each value parsed with `yaml.safe_load`, so
`optimizer.lr=3e-4`, `mesh.fsdp=4`, `compute_dtype=null` all work), then builds the schema,
checking every key and type. Any problem raises `ConfigError` naming the dotted key.
`to_dict(cfg)` gives back plain YAML-ready data (the resolved config saved in a run dir).

Field options (dataclass `metadata`): `choices` (allowed values), `doc` (one line).
Types understood: bool, int, float (ints accepted), str, `X | None`, `list[X]`,
`tuple[X, ...]`, `dict[str, X]`, nested dataclasses and `Any` (taken as is).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from jaxdefense.errors import ConfigError

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 / 5E+2 (no dot) as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def field(default: Any = _MISSING, *, choices: Sequence[Any] | None = None, doc: str = "", **kw):
    """`dataclasses.field` with `choices` and `doc` metadata; mutable defaults are copied."""
    metadata = {"choices": tuple(choices) if choices is not None else None, "doc": doc}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=metadata, **kw)
    if default is _MISSING:
        return dataclasses.field(metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def _copy(value):
    import copy

    return copy.deepcopy(value)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check/convert `value` against the annotation `tp`; raise ConfigError naming `key`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}: keys must be strings, got {k!r}")
            out[k] = _convert(vt, v, f"{key}.{k}")
        return out
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        et = args[0] if args else Any
        items = [_convert(et, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    for k in data:
        if k not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{dotted(k)}: unknown key (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = dotted(name)
        if name in data:
            value = _convert(hints[name], data[name], key)
        elif f.default is not _MISSING:
            value = f.default
        elif f.default_factory is not _MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            raise ConfigError(f"{key}: required key is missing")
        choices = f.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e
    return obj


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config tree; YAML-safe."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """"a.b.c=value" → (["a","b","c"], value parsed as YAML, where 1e-3 is a float)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """A copy of `data` with each "dotted.key=value" set (intermediate mappings are created)."""
    out = _copy(dict(data))
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a mapping, cannot set {'.'.join(parts)}")
            node = child
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """The YAML mapping in `path` (ConfigError if missing, unparsable or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {str(path)!r}: invalid YAML ({first})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
    return data


def load_config(
    path: str | Path | None, schema: type[T], overrides: Sequence[str] = (), base: Mapping | None = None
) -> T:
    """Read `path` (or start from `base`/defaults), apply overrides, validate into `schema`."""
    data = dict(base or {})
    if path is not None:
        data.update(read_yaml(path))
    data = apply_overrides(data, overrides)
    return from_dict(schema, data)


def dump_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two plain config trees differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            out.extend(diff_keys(a.get(k, _MISSING), b.get(k, _MISSING), key))
        return out
    return [] if a == b else [prefix or "<root>"]


# ---------------------------------------------------------------------------------------------
# Sections shared by every run config (train, immunize, attack, ...). Extend `RunConfig` by
# subclassing and adding fields (e.g. `method: dict[str, Any]`).

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class ModelSection:
    """Exactly one of `name` (a named config, random init from `seed`) or `path` (an HF dir)."""

    name: str | None = field(None, doc="named config: tiny, small, ... (random init)")
    path: str | None = field(None, doc="local Hugging Face checkpoint directory")
    dtype: str = field("float32", choices=DTYPES, doc="dtype of the master params")
    overrides: dict[str, Any] = field({}, doc="ModelConfig field overrides for a named config")

    def __post_init__(self):
        if (self.name is None) == (self.path is None):
            raise ConfigError("model: give exactly one of model.name (named config) or model.path (HF dir)")


@dataclasses.dataclass
class StreamSection:
    source: str = field(doc="data stream/source name, e.g. benign_instruct")
    split: str = field("train", doc="split of the source")
    batch_size: int = field(8)
    max_len: int = field(64, doc="tokens per row (padded/truncated)")
    limit: int | None = field(None, doc="use only the first N records of the split (fixed shuffle)")
    options: dict[str, Any] = field({}, doc="extra make_batches options: template, pack, shuffle")


@dataclasses.dataclass
class DataSection:
    tokenizer: str | None = field(
        None, doc='tokenizer dir/file, or "bpe:<vocab>" to train a tiny BPE on the streams; default: model.path'
    )
    dir: str | None = field(None, doc="data root (else --data-dir, $JAXDEFENSE_DATA_DIR, ../shared/data)")
    streams: dict[str, StreamSection] = field({})


@dataclasses.dataclass
class OptimizerSection:
    name: str = field("adamw", choices=("adamw", "adam", "sgd"))
    lr: float = field(1e-3)
    schedule: str = field("constant", choices=("constant", "cosine", "linear"))
    warmup_steps: int = field(0)
    weight_decay: float = field(0.0)
    clip: float | None = field(1.0, doc="global-norm gradient clipping (null: none)")
    b1: float = field(0.9)
    b2: float = field(0.999)
    eps: float = field(1e-8)
    momentum: float | None = field(None, doc="sgd momentum")


@dataclasses.dataclass
class MeshSection:
    data: int = field(1)
    fsdp: int = field(1)
    tensor: int = field(1)


@dataclasses.dataclass
class RunConfig:
    """Everything `jaxdefense train` needs; other commands subclass it."""

    model: ModelSection = field(ModelSection(name="tiny"))
    data: DataSection = field(DataSection())
    optimizer: OptimizerSection = field(OptimizerSection())
    mesh: MeshSection = field(MeshSection())
    steps: int = field(100)
    ckpt_every: int = field(0, doc="checkpoint every N steps (0: only at the end)")
    log_every: int = field(10)
    seed: int = field(0)
    compute_dtype: str | None = field(None, choices=DTYPES, doc="e.g. bfloat16: cast params inside the step")

    def __post_init__(self):
        for key in ("steps", "ckpt_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.log_every < 1:
            raise ConfigError(f"log_every: must be >= 1, got {self.log_every}")

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


_BOUNDS = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
           "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}


def field(default: Any = _MISSING, *, choices: Sequence[Any] | None = None, doc: str = "",
          ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
          registry: str | None = None, internal: bool = False, **kw):
    """`dataclasses.field` with config metadata; mutable defaults are copied.

    Args:
      choices: allowed values. doc: one line of help.
      ge, gt, le, lt: bounds checked by `from_dict` (a None value is not checked).
      registry: "method" | "attack": the value is a mapping whose `name` picks a registered
        dataclass (see `jaxdefense.registry`), the other keys are its fields.
      internal: not a config key (e.g. a method's bound ModelConfig): `from_dict` rejects it,
        `to_dict` leaves it out.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"choices": tuple(choices) if choices is not None else None, "doc": doc, "bounds": bounds,
                "registry": registry, "internal": internal}
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
        if len(errors) == 1:
            raise errors[0]
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


def _config_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def _merge(default: Any, value: Any) -> Any:
    """`value` laid over a dataclass default's own data, so a partial section keeps the parent's defaults."""
    if not (isinstance(value, Mapping) and dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return value
    base = to_dict(default)
    if "name" in base and "name" in value and value["name"] != base["name"]:
        return value
    out = dict(base)
    for k, v in value.items():
        sub = getattr(default, k, None) if k in base else None
        out[k] = _merge(sub, v) if dataclasses.is_dataclass(sub) else v
    return out


def check_bounds(key: str, value: Any, bounds: Mapping[str, float]) -> None:
    """ConfigError "key: must be > 0, got -1" when a number breaks a bound."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for kind, bound in bounds.items():
        ok, sign = _BOUNDS[kind]
        if not ok(value, bound):
            raise ConfigError(f"{key}: must be {sign} {bound:g}, got {value:g}")


def _registered(kind: str, value: Any, key: str) -> Any:
    from jaxdefense.registry import REGISTRIES

    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping with a 'name', got {value!r}")
    rest = dict(value)
    name = rest.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{key}.name: required (known: {', '.join(REGISTRIES[kind].names())})")
    return from_dict(REGISTRIES[kind].get(name, key=f"{key}.name"), rest, key)


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys, wrong types and values out of range."""
    hints = typing.get_type_hints(cls)
    fields = _config_fields(cls)
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    for k in data:
        if k not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{dotted(k)}: unknown key (known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = dotted(name)
        default = _default_of(f)
        kind = f.metadata.get("registry")
        if name in data:
            raw = _merge(default, data[name])
            value = _registered(kind, raw, key) if kind else _convert(hints[name], raw, key)
        elif default is not _MISSING:
            value = default
        else:
            raise ConfigError(f"{key}: required key is missing")
        choices = f.metadata.get("choices")
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        check_bounds(key, value, f.metadata.get("bounds") or {})
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if not prefix or message.startswith(prefix) else f"{prefix}: {message}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e
    return obj


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config tree; YAML-safe."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
               if not f.metadata.get("internal")}
        registered = getattr(type(obj), "registered_name", None)
        return {"name": registered, **out} if registered else out
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
    data = deep_merge(base or {}, read_yaml(path)) if path is not None else _copy(dict(base or {}))
    data = apply_overrides(data, overrides)
    return from_dict(schema, data)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict:
    """`over` laid over `base`, mapping by mapping (a value that is not a mapping replaces)."""
    out = _copy(dict(base))
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else _copy(v)
    return out


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
# Sections shared by every run config; `jaxdefense.schema.RunConfig` composes them.

DTYPES = ("float32", "bfloat16", "float16")
HALVES = ("all", "defender", "attacker")


@dataclasses.dataclass
class ModelSection:
    """Exactly one of `name` (a named config, random init from `seed`) or `path` (an HF dir or GGUF file).

    A pretrained name (`models.PRETRAINED`, e.g. smollm2-135m-instruct) is a checkpoint, not a random
    init: as `name` it is stored as `path`, which resolves it to the installed file.
    """

    name: str | None = field(None, doc="named config: tiny, small, ... (random init), or a pretrained name")
    path: str | None = field(None, doc="local HF checkpoint directory, run dir, .gguf file or pretrained name")
    dtype: str = field("float32", choices=DTYPES, doc="dtype of the master params")
    overrides: dict[str, Any] = field({}, doc="ModelConfig field overrides for a named config")

    def __post_init__(self):
        if (self.name is None) == (self.path is None):
            raise ConfigError("give exactly one of model.name (named config) or model.path (HF dir)")
        from jaxdefense.models.pretrained import is_pretrained

        if is_pretrained(self.name):
            if self.overrides:
                raise ConfigError(f"model.overrides: not allowed with the pretrained model {self.name!r}")
            self.name, self.path = None, self.name


@dataclasses.dataclass
class MixSection:
    """Records of another source appended to a stream (before its shuffle); split/half default to the stream's."""

    source: str = field(doc="data stream/source name, e.g. refusal")
    split: str | None = field(None, choices=("train", "validation", "test", "all"))
    half: str | None = field(None, choices=HALVES, doc="defender/attacker half of the prompts")
    limit: int | None = field(None, ge=1, doc="first N records of it (fixed shuffle)")


@dataclasses.dataclass
class StreamSection:
    """Run settings of one data stream; None keeps what the method's spec (or `data`) says."""

    source: str | None = field(None, doc="data stream/source name, e.g. benign_instruct (default: the spec's)")
    split: str | None = field(None, choices=("train", "validation", "test", "all"))
    half: str | None = field(None, choices=HALVES, doc="defender/attacker half of the prompts")
    batch_size: int | None = field(None, ge=1)
    max_len: int | None = field(None, ge=2, doc="tokens per row (padded/truncated)")
    limit: int | None = field(None, ge=1, doc="use only the first N records of the split (fixed shuffle)")
    options: dict[str, Any] = field({}, doc="extra make_batches options: pack, shuffle")
    mix: list[MixSection] = field([], doc="other sources whose records join this stream's (e.g. refusals "
                                          "mixed into benign SFT); not for paired streams")


@dataclasses.dataclass
class DataSection:
    tokenizer: str | None = field(
        None, doc='tokenizer dir/file, or "bpe:<vocab>" to train a tiny BPE on the streams; default: model.path'
    )
    dir: str | None = field(None, doc="data root (else --data-dir, $JAXDEFENSE_DATA_DIR, ../shared/data)")
    batch_size: int = field(8, ge=1, doc="rows per step of every stream (streams.<name>.batch_size overrides)")
    max_len: int = field(64, ge=2, doc="tokens per row of every stream")
    template: str = field("chat", doc="prompt template (see data.formatting)")
    streams: dict[str, StreamSection] = field({}, doc="per-stream settings, keyed by the method's stream names")


@dataclasses.dataclass
class OptimizerSection:
    """optax optimiser: (warm-up then) constant / cosine / linear decay to final_lr_fraction·lr."""

    name: str = field("adamw", choices=("adamw", "adam", "sgd"))
    lr: float = field(1e-3, gt=0)
    schedule: str = field("constant", choices=("constant", "cosine", "linear"))
    warmup_steps: int = field(0, ge=0)
    final_lr_fraction: float = field(0.0, ge=0, le=1, doc="decayed schedules end at this fraction of lr")
    weight_decay: float = field(0.0, ge=0)
    clip: float | None = field(1.0, gt=0, doc="global-norm gradient clipping (null: none)")
    b1: float = field(0.9, ge=0, lt=1)
    b2: float = field(0.999, ge=0, lt=1)
    eps: float = field(1e-8, gt=0)
    momentum: float | None = field(None, ge=0, lt=1, doc="sgd momentum")

    def __post_init__(self):
        if self.name == "adam" and self.weight_decay:
            raise ConfigError("optimizer.weight_decay: adam has no weight decay; use adamw")


@dataclasses.dataclass
class MeshSection:
    data: int = field(1, ge=1)
    fsdp: int = field(1, ge=1)
    tensor: int = field(1, ge=1)


@dataclasses.dataclass
class LoraSection:
    """LoRA over whatever trains (method or attack): rank 0 trains every parameter."""

    rank: int = field(0, ge=0, doc="0: full-parameter; r > 0: adapters of rank r, the base frozen")
    alpha: float = field(16.0, gt=0)
    targets: tuple[str, ...] = field(("wq", "wv"), doc="adapted weights")

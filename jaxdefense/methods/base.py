"""The method protocol and the registry that maps names to methods.

A method is a small frozen dataclass: its hyperparameters, plus a ``cfg`` field holding the
``ModelConfig`` it runs on. ``grad(params, batches, key) -> (grads, metrics)`` returns
gradients (not a loss: SEAM's finite difference estimates the gradient of no scalar);
``batches`` maps each name in ``streams`` to a token batch. The dataclass is hashable, so a
bound method is a valid ``jax.jit`` static argument and ``jax.jit(method.grad)`` compiles once
per shape.

Binding: ``SEAM(beta=1.0).bind(cfg)`` or ``get_method("seam", cfg=cfg, beta=1.0)``; ``cfg`` is an
ordinary field, ``bind`` is ``dataclasses.replace(self, cfg=cfg)``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from jaxdefense.errors import ConfigError

METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: ``METHODS[name] = cls`` (names are unique)."""

    def wrap(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} registered twice")
        METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of every method: ``cfg`` plus hyperparameters; subclasses set ``streams``, ``grad``."""

    cfg: Any = None
    name: ClassVar[str] = ""
    streams: ClassVar[tuple[str, ...]] = ()

    def bind(self, cfg) -> Method:
        return dataclasses.replace(self, cfg=cfg)

    def hyperparameters(self) -> dict[str, Any]:
        """Hyperparameters as a plain dict (everything but ``cfg``), for configs and reports."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cfg"}

    def grad(self, params, batches, key):
        raise NotImplementedError

    def _require_cfg(self):
        if self.cfg is None:
            raise ConfigError(f"method {self.name!r} is not bound to a model config: call .bind(cfg)")
        return self.cfg


def hyperparameter_names(cls: type[Method]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "cfg")


def _scalar_kind(annotation):
    """float/int/bool/str for ``float`` or ``float | None`` style annotations, else None."""
    if annotation in (float, int, bool, str):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (float, int, bool, str) else None


def _coerce(method: str, key: str, value, annotation):
    """Coerce a CLI/YAML value to the field's declared scalar type; ConfigError names the key."""
    kind = _scalar_kind(annotation)
    if kind is None or value is None:
        return value
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind is str and not isinstance(value, str):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"method {method!r} hyperparameter {key!r}: expected {kind.__name__}, got {value!r}"
        ) from None


def get_method(name: str, cfg=None, **hparams) -> Method:
    """``METHODS[name](cfg=cfg, **hparams)``; ConfigError names an unknown method or hyperparameter."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    cls = METHODS[name]
    known = hyperparameter_names(cls)
    for key in hparams:
        if key not in known:
            raise ConfigError(
                f"method {name!r} has no hyperparameter {key!r} (known: {', '.join(known)})"
            )
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(name, k, v, hints.get(k, "")) for k, v in hparams.items()}
    method = cls(cfg=cfg, **values)
    validate = getattr(method, "validate", None)
    if validate is not None:
        validate()
    return method

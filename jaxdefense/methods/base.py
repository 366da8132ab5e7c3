"""Building a registered defence from its config section: `get_method("seam", cfg, beta=1.0)`.

A method is one file in this package: a frozen dataclass of hyperparameters deriving from
`jaxdefense.objective.Objective`, registered with `@register_method(name)`; see objective.py
for the protocol (streams, init, grad, export).
"""

from __future__ import annotations

import dataclasses

from jaxdefense.config import from_dict
from jaxdefense.objective import Objective
from jaxdefense.registry import METHODS, Registry, register_method


def build(registry: Registry, name: str, cfg=None, **hparams) -> Objective:
    """`registry`'s class `name` from keyword hyperparameters, validated by the config engine and
    bound to `cfg` when given; ConfigError names the unknown name or the offending key."""
    cls = registry.get(name, key=f"{registry.kind}.name")
    objective = from_dict(cls, hparams, registry.kind)
    return objective.bind(cfg) if cfg is not None else objective


def get_method(name: str, cfg=None, **hparams) -> Objective:
    """The registered method `name` with these hyperparameters (see `build`)."""
    return build(METHODS, name, cfg, **hparams)


def hyperparameter_names(cls: type[Objective]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "cfg")


__all__ = ["METHODS", "build", "get_method", "hyperparameter_names", "register_method"]

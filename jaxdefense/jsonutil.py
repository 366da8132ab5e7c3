"""The one JSON cleaner: `to_jsonable(x)` turns reports, metrics and configs into plain JSON values.

- numpy / jax scalars → Python bool / int / float; numpy / jax arrays → (nested) lists;
- non-finite floats (NaN, ±inf) → None, so `json.dump(..., allow_nan=False)` writes valid JSON;
- tuples, lists and sets → lists (sets sorted when their items sort); mappings → dicts with str keys;
- dataclass instances → dicts of their fields; `os.PathLike` → str;
- None, bool, int, str pass through; anything else is returned unchanged (json then decides).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def to_jsonable(x: Any) -> Any:
    """A JSON-ready copy of `x` (see the module docstring)."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.generic):
        return to_jsonable(x.item())
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        items = [to_jsonable(v) for v in x]
        try:
            return sorted(items)
        except TypeError:
            return items
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "__array__") and hasattr(x, "dtype"):  # jax.Array and friends, without importing jax
        return to_jsonable(np.asarray(x))
    return x


__all__ = ["to_jsonable"]

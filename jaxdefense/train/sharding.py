"""Mesh construction and the shardings of params, optimiser state and batches.

A parameter's named dimensions ("logical axes", e.g. ("layers", "embed", "heads")) map to
mesh axes through `RULES`; a dimension whose size does not divide the product of its mesh
axes is replicated instead. The rules table and `logical_to_spec` live in
`models.sharding_rules` (the decoder constrains its activations with the same table) and are
re-exported here. The mesh is always built with `AxisType.Auto` (GSPMD propagation): the jax
default, Explicit, breaks unannotated model code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxdefense.errors import ConfigError
from jaxdefense.models.layout import WEIGHTS
from jaxdefense.models.sharding_rules import MESH_AXES, RULES, constrain, current_mesh, logical_to_spec

__all__ = ["MESH_AXES", "PARAM_AXES", "RULES", "activation_mesh", "batch_divisor", "batch_sharding", "constrain", "current_mesh",
           "like_params", "logical_to_spec", "make_mesh", "param_shardings", "param_specs", "put_global",
           "replicated", "shard_tree", "state_shardings", "to_host"]

# Parameter name (last key in the params pytree) → logical axes per dimension, from `models.layout`.
PARAM_AXES: dict[str, tuple[str, ...]] = {w.name: w.logical_axes for w in WEIGHTS}


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes over the first data·fsdp·tensor devices."""
    shape = (int(data), int(fsdp), int(tensor))
    if min(shape) < 1:
        raise ConfigError(f"mesh: axis sizes must be >= 1, got data={data} fsdp={fsdp} tensor={tensor}")
    available = list(devices) if devices is not None else jax.devices()
    need = math.prod(shape)
    if need > len(available):
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {need} but only {len(available)} devices are available"
        )
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=available[:need]
    )


def _leaf_axes(path: tuple[Any, ...], ndim: int) -> tuple[str | None, ...]:
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    name = keys[-1] if keys else None
    if name in PARAM_AXES and len(PARAM_AXES[name]) == ndim:
        return PARAM_AXES[name]
    # LoRA factors {"layers": {target: {"a": [L, in, r], "b": [L, r, out]}}}.
    if name in ("a", "b") and len(keys) >= 2 and keys[-2] in PARAM_AXES and ndim == 3:
        base = PARAM_AXES[keys[-2]]
        if len(base) == 3:
            return (base[0], base[1], "lora_rank") if name == "a" else (base[0], "lora_rank", base[2])
    return (None,) * ndim


def param_specs(params: Any, mesh: Mesh, rules: Mapping[str, Sequence[str]] = RULES) -> Any:
    """PartitionSpec per leaf of a params pytree (unknown names are replicated)."""

    def spec(path, x):
        shape = np.shape(x)
        return logical_to_spec(_leaf_axes(path, len(shape)), shape, mesh, rules)

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: Any, mesh: Mesh, rules: Mapping[str, Sequence[str]] = RULES) -> Any:
    """NamedSharding per leaf of `params` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules))


def batch_sharding(mesh: Mesh, rules: Mapping[str, Sequence[str]] = RULES) -> NamedSharding:
    """Sharding for batch arrays: leading dim over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",), None, mesh, rules))


def activation_mesh(mesh: Mesh | None):
    """Context in which the decoder's activation constraints (`models.sharding_rules.constrain`)
    use `mesh`: `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`, entered while a jitted step
    is traced; a null context for None."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh, rules: Mapping[str, Sequence[str]] = RULES) -> int:
    """Number of shards the batch dimension is split into."""
    return math.prod(mesh.shape[a] for a in rules["batch"] if a in mesh.shape)


def like_params(tree: Any, params_like: Any, param_leaf: Any, other_leaf: Any) -> Any:
    """Map every subtree of `tree` shaped like `params_like` to `param_leaf` (a pytree with
    the params structure); every other leaf to `other_leaf(leaf)`. Used for optimiser state."""
    treedef = jax.tree.structure(params_like)

    def is_params(node):
        try:
            return jax.tree.structure(node) == treedef
        except Exception:
            return False

    return jax.tree.map(
        lambda node: param_leaf if is_params(node) else other_leaf(node), tree, is_leaf=is_params
    )


def state_shardings(state: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimiser state: param-shaped subtrees (mu, nu, ...) follow the params,
    everything else (counts, scalars) is replicated."""
    return like_params(state, params, params_shardings, lambda _: replicated(mesh))


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place a host value (identical on every process) as a global array with `sharding`.

    Works single- and multi-process: each process fills its addressable shards."""
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_tree(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(put_global, tree, shardings)


def to_host(x: Any) -> np.ndarray:
    """Host copy of a (possibly multi-process, replicated) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)

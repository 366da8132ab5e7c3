"""The logical → physical sharding rules table, for weights and activations alike.

A dimension's logical axis (e.g. "embed", "heads", "batch") maps through `RULES` to the mesh
axes ("data", "fsdp", "tensor") it is split over; a dimension whose size does not divide the
product of its mesh axes is replicated instead. Weights use the names of `models.layout`;
activations use the "act_*" names and "batch" (MaxText's activation axes): the residual stream
[B, T, D] is ("batch", "act_length", "act_embed") → P(("data", "fsdp")), attention heads and
the MLP width go to "tensor". The weight "embed" axis (FSDP) and the activation "act_embed"
axis are distinct names, so an FSDP-sharded table never hands its split to the residual stream.

`constrain(x, axes)` is `lax.with_sharding_constraint` under the mesh of the current context
(`jax.set_mesh(mesh)` outside jit, `jax.sharding.use_abstract_mesh` inside; the training loop
enters it) and the identity without one, so the model code runs unchanged on one device.
`jaxdefense.train.sharding` builds meshes and param/optimiser shardings from the same table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from jaxdefense.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis → mesh axes (a tuple: the dimension is split over their product).
RULES: dict[str, tuple[str, ...]] = {
    # weights (models.layout)
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": (),
    "norm": (),
    "lora_rank": (),
    # activations (and batches)
    "batch": ("data", "fsdp"),
    "length": (),
    "act_length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "act_head_dim": (),
}

# Activation layouts of the decoder (`models.decoder`), one tuple of logical axes per array kind.
RESIDUAL = ("batch", "act_length", "act_embed")              # x, h        [B, T, D]
QUERY = ("batch", "act_length", "act_kv_heads", None, "act_head_dim")  # q [B, T, Hk, G, Dh]
KEY_VALUE = ("batch", "act_length", "act_kv_heads", "act_head_dim")   # k, v [B, T, Hk, Dh]
ATTN_OUT = ("batch", "act_length", "act_heads")              # attention output [B, T, Hq·Dh]
MLP_HIDDEN = ("batch", "act_length", "act_mlp")              # silu(h W_gate) ⊙ h W_up [B, T, F]
LOGITS = ("batch", "act_length", "act_vocab")                # [B, T, V]
TOKENS = ("batch", "act_length")                             # ids, masks, per-token NLL [B, T]


def _mesh_sizes(mesh: Any) -> Mapping[str, int]:
    return dict(mesh.shape)


def logical_to_spec(
    logical: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Any = None,
    rules: Mapping[str, Sequence[str]] = RULES,
) -> P:
    """PartitionSpec for logical axes; dims that do not divide their mesh axes are replicated.

    Args:
      logical: one logical axis name (or None: replicated) per dimension.
      shape: the array's shape (divisibility is checked only when shape and mesh are given).
      mesh: a `Mesh` or `AbstractMesh`; mesh axes it lacks or of size 1 are dropped.
      rules: logical axis → mesh axes.
    Returns:
      The PartitionSpec, trailing replicated dims dropped.
    Raises ConfigError if two dimensions would use the same mesh axis, or an axis is unknown.
    """
    sizes = _mesh_sizes(mesh) if mesh is not None else None
    used: dict[str, str] = {}
    spec: list[Any] = []
    for dim, name in enumerate(logical):
        if name is not None and name not in rules:
            raise ConfigError(f"sharding: no rule for logical axis {name!r}")
        physical = tuple(rules[name]) if name is not None else ()
        for axis in physical:
            if axis in used:
                raise ConfigError(
                    f"sharding: logical axes {used[axis]!r} and {name!r} both map to mesh axis {axis!r}"
                )
            used[axis] = name
        if sizes is not None:
            physical = tuple(a for a in physical if sizes.get(a, 1) > 1)
        if shape is not None and sizes is not None and physical:
            if shape[dim] % math.prod(sizes[a] for a in physical):
                physical = ()
        spec.append(None if not physical else physical[0] if len(physical) == 1 else physical)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def current_mesh() -> Any:
    """The abstract mesh of the current context (`jax.set_mesh` / `use_abstract_mesh`), or None."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or getattr(mesh, "empty", False) or not getattr(mesh, "axis_names", ()):
        return None
    return mesh


def constrain(x: jax.Array, logical: Sequence[str | None], rules: Mapping[str, Sequence[str]] = RULES) -> jax.Array:
    """x constrained to the sharding of its logical axes on the context mesh; x itself without one.

    Args:
      x: an array of len(logical) dimensions.
      logical: logical axis per dimension (e.g. `RESIDUAL`).
    Returns:
      `lax.with_sharding_constraint(x, spec)`, or x when no mesh is active or every
      dimension is replicated on it (a fully replicated constraint would force a gather).
    """
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(logical, x.shape, mesh, rules)
    if not any(s is not None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, spec)

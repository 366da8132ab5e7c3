"""Pytree vector algebra used by the curvature code.

Reductions (dots, norms) accumulate in at least float32 (float64 stays float64), and
element-wise results keep the dtype of their first argument unless stated otherwise.
Everything is plain `jnp` on leaves, so it keeps the shardings of sharded params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def acc_dtype(dtype) -> jnp.dtype:
    """The accumulation dtype for a leaf dtype: float32, or wider if the leaf is wider."""
    return jnp.promote_types(jnp.float32, dtype)


def tree_acc_dtype(tree) -> jnp.dtype:
    """The widest accumulation dtype over the leaves of `tree`."""
    dtype = jnp.dtype(jnp.float32)
    for leaf in jax.tree.leaves(tree):
        dtype = jnp.promote_types(dtype, leaf.dtype)
    return dtype


def tree_vdot(a, b):
    """⟨a, b⟩ = Σ_leaves Σ a·b, accumulated in float32 (or float64 for float64 leaves)."""
    dtype = tree_acc_dtype(a)
    parts = [
        jnp.sum(x.astype(dtype) * y.astype(dtype))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(parts, jnp.zeros((), dtype))


def tree_norm(a):
    """‖a‖₂ over all leaves, accumulated like `tree_vdot`."""
    return jnp.sqrt(tree_vdot(a, a))


def tree_cast(a, dtype):
    """Cast every leaf to `dtype`."""
    return jax.tree.map(lambda x: x.astype(dtype), a)


def tree_cast_like(a, like):
    """Cast every leaf of `a` to the dtype of the matching leaf of `like`."""
    return jax.tree.map(lambda x, y: x.astype(y.dtype), a, like)


def tree_to_acc(a):
    """Cast every leaf to its accumulation dtype (bf16 → f32, f64 stays)."""
    return jax.tree.map(lambda x: x.astype(acc_dtype(x.dtype)), a)


def tree_add(a, b):
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def tree_sub(a, b):
    return jax.tree.map(lambda x, y: x - y.astype(x.dtype), a, b)


def tree_scale(a, s):
    """s·a with `s` a scalar (cast to each leaf's dtype)."""
    return jax.tree.map(lambda x: x * jnp.asarray(s).astype(x.dtype), a)


def tree_lincomb(coeffs, trees):
    """Σ_i coeffs[i]·trees[i], computed in the accumulation dtype of the first tree."""
    def combine(*leaves):
        dtype = acc_dtype(leaves[0].dtype)
        out = jnp.asarray(coeffs[0]).astype(dtype) * leaves[0].astype(dtype)
        for c, x in zip(coeffs[1:], leaves[1:]):
            out = out + jnp.asarray(c).astype(dtype) * x.astype(dtype)
        return out

    return jax.tree.map(combine, *trees)


def tree_size(a) -> int:
    """Number of scalars in the pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(a))


def _tree_random(sample, key, like, dtype):
    """`sample(key, shape, dtype)` per leaf of `like`, one split key each, in the leaves' accumulation dtype."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [sample(k, x.shape, dtype or acc_dtype(x.dtype)) for k, x in zip(keys, leaves)])


def tree_random_normal(key, like, dtype=None):
    """Standard normal pytree with the structure and shapes of `like`."""
    return _tree_random(jax.random.normal, key, like, dtype)


def tree_random_rademacher(key, like, dtype=None):
    """±1 pytree with the structure and shapes of `like`."""
    return _tree_random(jax.random.rademacher, key, like, dtype)


def tree_random_unit(key, like, dtype=None):
    """A uniformly random direction on the unit sphere of the flattened pytree."""
    v = tree_random_normal(key, like, dtype)
    return tree_scale(v, 1.0 / tree_norm(v))

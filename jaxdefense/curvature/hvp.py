"""Hessian-vector and Gauss–Newton-vector products of loss functions.

Every function takes `loss_fn(params, batch) -> scalar` (or `(scalar, aux)` with
`has_aux=True`) and pytree params; tangents are cast to the dtype of the matching parameter
leaf, as forward-mode AD requires.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdefense.curvature._tree import acc_dtype, tree_cast_like, tree_vdot
from jaxdefense.errors import ConfigError

HVP_MODES = ("fwd_rev", "rev_rev", "rev_fwd")


def scalar_loss(loss_fn: Callable, has_aux: bool) -> Callable:
    """`loss_fn` with any aux output dropped: (params, batch) -> scalar."""
    if not has_aux:
        return loss_fn
    return lambda params, batch: loss_fn(params, batch)[0]


def value_and_grad(loss_fn: Callable, params, batch, *, has_aux: bool = False):
    """(value, grad, aux) of `loss_fn` at `params`; aux is None without has_aux."""
    if has_aux:
        (value, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return value, grad, aux
    value, grad = jax.value_and_grad(loss_fn)(params, batch)
    return value, grad, None


def hvp(loss_fn: Callable, params, batch, v, *, mode: str = "fwd_rev", has_aux: bool = False):
    """H(θ)·v with H = ∇²_θ loss_fn(θ, batch).

    mode "fwd_rev": jvp(∇L)(θ; v) (forward over reverse, the cheapest);
    "rev_rev": ∇_θ⟨∇L(θ), v⟩; "rev_fwd": ∇_θ (∂_v L)(θ).
    """
    f = scalar_loss(loss_fn, has_aux)
    v = tree_cast_like(v, params)
    if mode == "fwd_rev":
        return jax.jvp(lambda p: jax.grad(f)(p, batch), (params,), (v,))[1]
    if mode == "rev_rev":
        return jax.grad(lambda p: tree_vdot(jax.grad(f)(p, batch), v))(params)
    if mode == "rev_fwd":
        return jax.grad(lambda p: jax.jvp(lambda q: f(q, batch), (p,), (v,))[1])(params)
    raise ConfigError(f"hvp mode must be one of {HVP_MODES}, got {mode!r}")


def linearize_grad(loss_fn: Callable, params, batch, *, has_aux: bool = False):
    """(value, grad, hvp_fn, aux): ∇L at θ and the linear map v ↦ H(θ)v, via jax.linearize.

    The gradient comes out of the same pass that records the linearisation, so the
    gradient and any number of HVPs at θ cost one forward-over-reverse pass plus one
    tangent pass per product. Memory: the residuals of the gradient computation are kept.
    hvp_fn is a `jax.tree_util.Partial`, so it can be returned from and passed into jit.
    """
    if has_aux:
        def grad_with_value(p):
            (value, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
            return grad, (value, aux)
    else:
        def grad_with_value(p):
            value, grad = jax.value_and_grad(loss_fn)(p, batch)
            return grad, (value, None)

    grad, lin_fn, (value, aux) = jax.linearize(grad_with_value, params, has_aux=True)
    hvp_fn = jax.tree_util.Partial(_apply_linear, lin_fn, grad)
    return value, grad, hvp_fn, aux


def _apply_linear(lin_fn, like, v):
    return lin_fn(tree_cast_like(v, like))


def linearized_hvp(loss_fn: Callable, params, batch, *, has_aux: bool = False):
    """(grad, hvp_fn): ∇L(θ) and v ↦ H(θ)v for many products at one point (jax.linearize)."""
    _, grad, hvp_fn, _ = linearize_grad(loss_fn, params, batch, has_aux=has_aux)
    return grad, hvp_fn


def gnvp(logits_fn: Callable, params, batch, v, *, mask: Any = None):
    """Gauss–Newton product G·v = Jᵀ H_CE J v for a masked mean cross-entropy.

    z = logits_fn(params, batch) with shape [..., V]; the loss is
    L = Σ_t m_t CE(z_t, y_t) / Σ_t m_t, so per logit row t
    H_CE,t = (m_t / Σm)·(diag(p_t) − p_t p_tᵀ), p_t = softmax(z_t) (labels drop out).
    `mask` has shape z.shape[:-1] (all ones when None). For next-token LM losses pass
    logits[:, :-1] and mask = loss_mask[:, 1:]. One forward, one jvp and one transpose.
    """
    logits, jvp_fn = jax.linearize(lambda p: logits_fn(p, batch), params)
    dtype = acc_dtype(logits.dtype)
    jv = jvp_fn(tree_cast_like(v, params)).astype(dtype)
    probs = jax.nn.softmax(logits.astype(dtype), axis=-1)
    h_jv = probs * (jv - jnp.sum(probs * jv, axis=-1, keepdims=True))
    weights = jnp.ones(logits.shape[:-1], dtype) if mask is None else mask.astype(dtype)
    weights = weights / jnp.sum(weights)
    h_jv = h_jv * weights[..., None]
    (out,) = jax.linear_transpose(jvp_fn, params)(h_jv.astype(logits.dtype))
    return out

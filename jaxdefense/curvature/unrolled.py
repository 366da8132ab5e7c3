"""Gradients through K simulated fine-tuning steps (MLAC's MAML, TAR's inner adversary).

    θ_0 = θ,  θ_{k+1} = U(θ_k, ∇L_in(θ_k; B_k), state_k)
    F(θ) = L_out(θ_K(θ); B_out)                              outer_weights=None
    F(θ) = Σ_{k=0..K} w_k · L_out(θ_k(θ); B_out)             outer_weights=(w_0, …, w_K)

U is SGD (θ − lr·g) or Adam (bias-corrected, as optax.adam:
m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², θ ← θ − lr·m̂/(√v̂ + ε̂)). weight_decay λ adds decoupled
decay as optax.adamw (and torch.optim.AdamW): θ ← θ − lr·(m̂/(√v̂ + ε̂) + λθ); for SGD this is
θ − lr·(g + λθ). "adamw" is "adam" under another name (its decay is `weight_decay`).
Steps with w_k = 0 do not evaluate L_out (a `lax.cond`), so TAR's "every 4th step" costs one
outer evaluation per 4 steps.

first_order=False differentiates F exactly (reverse over the whole inner loop, second order).
Memory: the inner loop is a two-level rematerialised scan. Steps are grouped in segments of
S = `remat_segment` (default round(√K)); the outer scan over segments keeps one carry (θ_k,
the Adam moments) per segment, and the backward pass of a segment recomputes that segment's
S carries from its first one and each step's forward/backward from its carry. Peak carry
memory is about (K/S + S)·|carry| = O(√K·|θ|) instead of O(K·|θ|) for a flat scan over
checkpointed steps (remat_segment=1), at the cost of one more forward pass of the inner loop.
first_order=True is FO-MAML: ∇F ≈ Σ_k w_k ∇L_out(θ_k) with every θ_k held constant (TAR's
official accumulation; ∇L_out(θ_K) alone without outer_weights), no inner memory.

`unrolled_loss` is the exact F itself, differentiable in params and in a traced `lr` (MLAC's
learned inner learning rate).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.curvature._tree import acc_dtype, tree_acc_dtype
from jaxdefense.curvature.hvp import scalar_loss, value_and_grad
from jaxdefense.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")


def _safe_sqrt(x):
    """√x with derivative 0 (not ∞·0 = NaN) where x = 0, i.e. for never-updated entries."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _leading_size(batches) -> int:
    sizes = {int(x.shape[0]) for x in jax.tree.leaves(batches)}
    if len(sizes) != 1:
        raise ConfigError(f"inner_batches leaves must share one leading (step) axis, got sizes {sorted(sizes)}")
    return sizes.pop()


def _update_fn(optimizer, b1, b2, adam_eps, weight_decay):
    """(θ, m, v, g, k, lr) -> (θ', m', v') for one SGD / Adam(W) step k (0-based)."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unrolled_grad optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    decay = float(weight_decay)
    if decay < 0:
        raise ConfigError(f"unrolled_grad weight_decay must be >= 0, got {weight_decay}")

    def decayed(d, p):
        return d + decay * p.astype(d.dtype) if decay else d

    def update(theta, m, v, g, k, lr):
        if optimizer == "sgd":
            theta = jax.tree.map(lambda p, d: (p - lr * decayed(d, p)).astype(p.dtype), theta, g)
            return theta, m, v
        m = jax.tree.map(lambda a, d: b1 * a + (1 - b1) * d.astype(a.dtype), m, g)
        v = jax.tree.map(lambda a, d: b2 * a + (1 - b2) * jnp.square(d.astype(a.dtype)), v, g)

        def step(p, m_k, v_k):
            t = (k + 1).astype(m_k.dtype)
            m_hat = m_k / (1 - b1**t)
            v_hat = v_k / (1 - b2**t)
            return (p - lr * decayed(m_hat / (_safe_sqrt(v_hat) + adam_eps), p)).astype(p.dtype)

        return jax.tree.map(step, theta, m, v), m, v

    return update


def _segmented_scan(body, carry, xs, steps: int, segment: int):
    """`lax.scan(checkpoint(body), carry, xs)` over `steps` entries, as a scan over checkpointed
    segments of `segment` checkpointed steps (plus a tail of steps mod segment)."""
    step_fn = jax.checkpoint(body, prevent_cse=False)
    if segment <= 1 or segment >= steps:
        return jax.lax.scan(step_fn, carry, xs)
    n = steps // segment

    def run_segment(c, seg_xs):
        return jax.lax.scan(step_fn, c, seg_xs)

    head = jax.tree.map(lambda x: x[: n * segment].reshape(n, segment, *x.shape[1:]), xs)
    carry, ys = jax.lax.scan(jax.checkpoint(run_segment, prevent_cse=False), carry, head)
    ys = jax.tree.map(lambda y: y.reshape(n * segment, *y.shape[2:]), ys)
    if n * segment < steps:
        tail = jax.tree.map(lambda x: x[n * segment:], xs)
        carry, ys_tail = jax.lax.scan(step_fn, carry, tail)
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_tail)
    return carry, ys


def _resolve(inner_batches, steps, outer_weights, remat_segment):
    num_batches = _leading_size(inner_batches)
    steps = num_batches if steps is None else int(steps)
    if steps < 1:
        raise ConfigError(f"unrolled_grad steps must be >= 1, got {steps}")
    weights = None
    if outer_weights is not None:
        weights = np.asarray(outer_weights, dtype=np.float64)
        if weights.shape != (steps + 1,):
            raise ConfigError(f"unrolled_grad outer_weights must have steps + 1 = {steps + 1} entries "
                              f"(θ_0 … θ_K), got shape {weights.shape}")
    segment = max(1, round(math.sqrt(steps))) if remat_segment is None else int(remat_segment)
    if segment < 1:
        raise ConfigError(f"unrolled_grad remat_segment must be >= 1, got {remat_segment}")
    return num_batches, steps, weights, segment


def _unroll(outer_loss, outer_batch, inner_loss, inner_batches, params, *, steps, lr, optimizer, first_order,
            b1, b2, adam_eps, weight_decay, outer_weights, remat_segment, has_aux):
    """(F, first-order grad accumulator or None, aux) of one pass through the inner loop."""
    num_batches, steps, weights, segment = _resolve(inner_batches, steps, outer_weights, remat_segment)
    update = _update_fn(optimizer, b1, b2, adam_eps, weight_decay)
    f_in = scalar_loss(inner_loss, has_aux)
    f_out = scalar_loss(outer_loss, has_aux)
    dtype = tree_acc_dtype(params)
    zero = jnp.zeros((), dtype)

    def grad_zeros(theta):
        return jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype(p.dtype)), theta)

    def outer_term(acc, theta, w):
        """acc + w·L_out(θ) (and + w·∇L_out(θ) for first order); L_out is skipped where w = 0."""
        if first_order:
            def evaluate(t):
                value, g = jax.value_and_grad(f_out)(t, outer_batch)
                return value.astype(dtype), jax.tree.map(lambda x: x.astype(acc_dtype(x.dtype)), g)

            value, g = jax.lax.cond(w != 0, evaluate, lambda t: (zero, grad_zeros(t)), theta)
            total, g_acc = acc
            return (total + w * value, jax.tree.map(lambda a, b: a + w.astype(a.dtype) * b, g_acc, g)), value
        value = jax.lax.cond(w != 0, lambda t: f_out(t, outer_batch).astype(dtype), lambda t: zero, theta)
        return acc + w * value, value

    def body(carry, xs):
        theta, m, v, acc = carry
        k, w = xs
        batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k % num_batches, keepdims=False),
                             inner_batches)
        loss, g = jax.value_and_grad(f_in)(theta, batch)
        theta, m, v = update(theta, m, v, g, k, lr)
        outer_value = zero
        if weights is not None:
            acc, outer_value = outer_term(acc, theta, w)
        return (theta, m, v, acc), (loss, outer_value)

    moments = () if optimizer == "sgd" else grad_zeros(params)
    acc = (zero, grad_zeros(params)) if first_order else zero
    outer0 = zero
    if weights is not None and weights[0] != 0:
        acc, outer0 = outer_term(acc, params, jnp.asarray(weights[0], dtype))
    ws = jnp.asarray(weights[1:] if weights is not None else np.zeros(steps), dtype)
    carry = (params, moments, moments, acc)
    if first_order:
        (theta_k, _, _, acc), (inner_losses, outer_losses) = jax.lax.scan(body, carry, (jnp.arange(steps), ws))
    else:
        (theta_k, _, _, acc), (inner_losses, outer_losses) = _segmented_scan(
            body, carry, (jnp.arange(steps), ws), steps, segment)
    aux = {"inner_losses": inner_losses}
    if weights is not None:
        aux["outer_losses"] = jnp.concatenate([outer0[None], outer_losses])
        value, g_acc = acc if first_order else (acc, None)
        return value, g_acc, aux
    if first_order:
        value, grad, outer_aux = value_and_grad(outer_loss, theta_k, outer_batch, has_aux=has_aux)
        if has_aux:
            aux["outer_aux"] = outer_aux
        return value, grad, aux
    if has_aux:
        value, aux["outer_aux"] = outer_loss(theta_k, outer_batch)
    else:
        value = outer_loss(theta_k, outer_batch)
    return value, None, aux


def unrolled_loss(
    outer_loss: Callable,
    outer_batch,
    inner_loss: Callable,
    inner_batches,
    params,
    *,
    steps: int | None = None,
    lr,
    optimizer: str = "sgd",
    b1: float = 0.9,
    b2: float = 0.999,
    adam_eps: float = 1e-8,
    weight_decay: float = 0.0,
    outer_weights=None,
    remat_segment: int | None = None,
    has_aux: bool = False,
):
    """(F(θ), aux): the composed scalar, differentiable (exactly, with the segmented remat) in
    `params` and in a traced `lr`. Arguments as `unrolled_grad`."""
    value, _, aux = _unroll(outer_loss, outer_batch, inner_loss, inner_batches, params, steps=steps, lr=lr,
                            optimizer=optimizer, first_order=False, b1=b1, b2=b2, adam_eps=adam_eps,
                            weight_decay=weight_decay, outer_weights=outer_weights, remat_segment=remat_segment,
                            has_aux=has_aux)
    return value, aux


def unrolled_grad(
    outer_loss: Callable,
    outer_batch,
    inner_loss: Callable,
    inner_batches,
    params,
    *,
    steps: int | None = None,
    lr,
    optimizer: str = "sgd",
    first_order: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    adam_eps: float = 1e-8,
    weight_decay: float = 0.0,
    outer_weights=None,
    remat_segment: int | None = None,
    has_aux: bool = False,
):
    """(F, ∇F(θ) or its first-order estimate, aux) through `steps` inner SGD/Adam(W) steps.

    inner_batches: a batch pytree whose leaves are stacked on a leading axis of size n;
    step k uses entry k mod n (steps defaults to n). lr may be a traced scalar.
    outer_weights: None (F = L_out(θ_K)) or K+1 static weights w_k of L_out(θ_k), k = 0..K.
    remat_segment: steps per rematerialised segment of the exact pass (default round(√K)).
    aux["inner_losses"]: L_in(θ_k; B_k) for k = 0..K−1; with outer_weights,
    aux["outer_losses"]: L_out(θ_k) for k = 0..K (0 where w_k = 0; the outer aux is dropped);
    without, aux["outer_aux"] with has_aux.
    """
    kw = dict(steps=steps, lr=lr, optimizer=optimizer, b1=b1, b2=b2, adam_eps=adam_eps, weight_decay=weight_decay,
              outer_weights=outer_weights, remat_segment=remat_segment, has_aux=has_aux)
    if first_order:
        value, grad, aux = _unroll(outer_loss, outer_batch, inner_loss, inner_batches, params, first_order=True, **kw)
        if outer_weights is not None:
            grad = jax.tree.map(lambda g, p: g.astype(p.dtype), grad, params)
        return value, grad, aux
    (value, aux), grad = jax.value_and_grad(
        lambda p: unrolled_loss(outer_loss, outer_batch, inner_loss, inner_batches, p, **kw), has_aux=True)(params)
    return value, grad, aux

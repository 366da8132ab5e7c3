"""Gradients through K simulated fine-tuning steps (MLAC's MAML, TAR's inner adversary).

    θ_0 = θ,  θ_{k+1} = U(θ_k, ∇L_in(θ_k; B_k), state_k),   F(θ) = L_out(θ_K(θ); B_out)

U is SGD (θ − lr·g) or Adam (bias-corrected, as optax.adam:
m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², θ ← θ − lr·m̂/(√v̂ + ε̂)).

first_order=False differentiates F exactly (second order, reverse over the whole inner
loop): the inner loop is a `lax.scan` over a `jax.checkpoint`-ed step, so the backward pass
keeps one carry (θ_k and the Adam moments) per step — memory O(K·|θ|) — and recomputes
each step's forward/backward. first_order=True is FO-MAML: ∇F ≈ ∇L_out(θ_K), one extra
gradient after K inner gradients, no inner memory.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdefense.curvature._tree import acc_dtype
from jaxdefense.curvature.hvp import scalar_loss, value_and_grad
from jaxdefense.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")


def _safe_sqrt(x):
    """√x with derivative 0 (not ∞·0 = NaN) where x = 0, i.e. for never-updated entries."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _leading_size(batches) -> int:
    sizes = {int(x.shape[0]) for x in jax.tree.leaves(batches)}
    if len(sizes) != 1:
        raise ConfigError(f"inner_batches leaves must share one leading (step) axis, got sizes {sorted(sizes)}")
    return sizes.pop()


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
    has_aux: bool = False,
):
    """(L_out(θ_K), ∇F(θ), aux) through `steps` inner SGD/Adam steps on `inner_batches`.

    inner_batches: a batch pytree whose leaves are stacked on a leading axis of size n;
    step k uses entry k mod n (steps defaults to n). aux["inner_losses"]: L_in(θ_k; B_k)
    for k = 0..K−1.
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unrolled_grad optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    num_batches = _leading_size(inner_batches)
    steps = num_batches if steps is None else int(steps)
    if steps < 1:
        raise ConfigError(f"unrolled_grad steps must be >= 1, got {steps}")
    f_in = scalar_loss(inner_loss, has_aux)

    def inner_step(carry, k):
        theta, m, v = carry
        batch = jax.tree.map(
            lambda x: jax.lax.dynamic_index_in_dim(x, k % num_batches, keepdims=False), inner_batches
        )
        loss, g = jax.value_and_grad(f_in)(theta, batch)
        if optimizer == "sgd":
            theta = jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), theta, g)
            return (theta, m, v), loss
        m = jax.tree.map(lambda a, d: b1 * a + (1 - b1) * d.astype(a.dtype), m, g)
        v = jax.tree.map(lambda a, d: b2 * a + (1 - b2) * jnp.square(d.astype(a.dtype)), v, g)

        def update(p, m_k, v_k):
            t = (k + 1).astype(m_k.dtype)
            m_hat = m_k / (1 - b1**t)
            v_hat = v_k / (1 - b2**t)
            return (p - lr * m_hat / (_safe_sqrt(v_hat) + adam_eps)).astype(p.dtype)

        theta = jax.tree.map(update, theta, m, v)
        return (theta, m, v), loss

    def adapt(theta0):
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype(p.dtype)), theta0)
        (theta_k, _, _), losses = jax.lax.scan(
            jax.checkpoint(inner_step, prevent_cse=False), (theta0, zeros, zeros), jnp.arange(steps)
        )
        return theta_k, losses

    if first_order:
        theta_k, inner_losses = adapt(params)
        outer_value, grad, outer_aux = value_and_grad(outer_loss, theta_k, outer_batch, has_aux=has_aux)
    else:
        def objective(theta0):
            theta_k, losses = adapt(theta0)
            if has_aux:
                value, out_aux = outer_loss(theta_k, outer_batch)
                return value, (losses, out_aux)
            return outer_loss(theta_k, outer_batch), (losses, None)

        (outer_value, (inner_losses, outer_aux)), grad = jax.value_and_grad(objective, has_aux=True)(params)

    aux = {"inner_losses": inner_losses}
    if has_aux:
        aux["outer_aux"] = outer_aux
    return outer_value, grad, aux

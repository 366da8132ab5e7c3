"""Curvature spectra over pytrees: Lanczos eigenpairs, SLQ densities, condition numbers,
Hessian-Lipschitz estimates and SEAM's Theorem 1 error bound.

Lanczos (with full reorthogonalisation) builds an orthonormal Krylov basis Q and the
tridiagonal T = QᵀAQ; eigh(T) = S Θ Sᵀ gives Ritz values Θ and Ritz vectors QS. Basis
vectors are pytrees stacked on a leading axis (float32 at least), so sharded params stay
sharded. Memory: num_iters × |θ|.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdefense.curvature._tree import (
    tree_acc_dtype,
    tree_cast,
    tree_cast_like,
    tree_norm,
    tree_random_rademacher,
    tree_random_unit,
    tree_scale,
    tree_size,
    tree_sub,
    tree_vdot,
)
from jaxdefense.curvature.hvp import hvp, linearized_hvp
from jaxdefense.errors import ConfigError


def _basis_dots(basis, w):
    """[m] vector of ⟨Q_i, w⟩ for a stacked basis."""
    parts = [
        jnp.tensordot(q, x.astype(q.dtype), axes=x.ndim)
        for q, x in zip(jax.tree.leaves(basis), jax.tree.leaves(w), strict=True)
    ]
    return sum(parts)


def _basis_combine(basis, coeffs):
    """Σ_i coeffs[i]·Q_i (coeffs [m]) or, for coeffs [m, r], the r combinations stacked."""
    return jax.tree.map(lambda q: jnp.tensordot(coeffs.T.astype(q.dtype), q, axes=1), basis)


def _orthogonalise(basis, w):
    """w minus its projection on the basis, twice (classical Gram–Schmidt, reorthogonalised)."""
    for _ in range(2):
        coeffs = _basis_dots(basis, w)
        w = jax.tree.map(lambda x, p: x - p, w, _basis_combine(basis, coeffs))
    return w


def lanczos_tridiag(matvec: Callable, v0, num_iters: int, *, key=None):
    """(alphas [m], betas [m−1], basis): m = num_iters Lanczos steps from v0.

    matvec maps a pytree shaped like v0 (and with v0's dtypes) to one of the same shapes and
    must be symmetric. An invariant subspace (β ≈ 0) restarts from a random vector
    orthogonal to the basis, with β = 0 recorded, so T stays exact block-diagonal.
    """
    m = int(num_iters)
    n = tree_size(v0)
    if not 1 <= m <= n:
        raise ConfigError(f"lanczos num_iters must be in [1, {n}] (the dimension), got {m}")
    dtype = tree_acc_dtype(v0)
    key = jax.random.key(0) if key is None else key
    q0 = tree_cast(v0, dtype)
    q0 = tree_scale(q0, 1.0 / tree_norm(q0))
    basis = jax.tree.map(lambda x: jnp.zeros((m,) + x.shape, dtype), q0)
    tol = 100 * jnp.finfo(dtype).eps

    def body(j, state):
        basis, q, q_prev, beta_prev, alphas, betas, scale = state
        basis = jax.tree.map(lambda b, x: b.at[j].set(x), basis, q)
        w = tree_cast(matvec(tree_cast_like(q, v0)), dtype)
        alpha = tree_vdot(q, w)
        w = jax.tree.map(lambda x, a, b: x - alpha * a - beta_prev * b, w, q, q_prev)
        w = _orthogonalise(basis, w)
        beta = tree_norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        breakdown = beta <= tol * scale

        def restart(_):
            r = tree_random_unit(jax.random.fold_in(key, j), q0, dtype)
            r = _orthogonalise(basis, r)
            return tree_scale(r, 1.0 / tree_norm(r)), jnp.zeros((), dtype)

        def proceed(_):
            return tree_scale(w, 1.0 / beta), beta

        q_next, beta = jax.lax.cond(breakdown & (j + 1 < m), restart, proceed, None)
        alphas = alphas.at[j].set(alpha)
        betas = betas.at[j].set(beta)
        return basis, q_next, q, beta, alphas, betas, scale

    zeros_m = jnp.zeros((m,), dtype)
    init = (basis, q0, jax.tree.map(jnp.zeros_like, q0), jnp.zeros((), dtype), zeros_m, zeros_m, jnp.zeros((), dtype))
    basis, _, _, _, alphas, betas, _ = jax.lax.fori_loop(0, m, body, init)
    return alphas, betas[: m - 1], basis


def _tridiag_eigh(alphas, betas):
    t = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    return jnp.linalg.eigh(t)


def lanczos(matvec: Callable, v0, k: int, *, num_iters: int | None = None, key=None):
    """(eigvals [k] descending, eigvecs [k, ...] stacked pytree): top-k Ritz pairs.

    Runs num_iters (default k) Lanczos steps with full reorthogonalisation from v0; the
    extreme Ritz values converge first, so num_iters ≥ 2k gives accurate top-k values.
    With num_iters = dimension the result is the exact eigendecomposition.
    """
    m = k if num_iters is None else int(num_iters)
    if not 1 <= k <= m:
        raise ConfigError(f"lanczos k must be in [1, num_iters={m}], got {k}")
    alphas, betas, basis = lanczos_tridiag(matvec, v0, m, key=key)
    theta, s = _tridiag_eigh(alphas, betas)
    order = jnp.argsort(-theta)[:k]
    return theta[order], _basis_combine(basis, s[:, order])


def hessian_top_eigs(loss_fn: Callable, params, batch, k: int, key, *, num_iters: int | None = None, has_aux: bool = False):
    """(eigvals [k] descending, eigvecs [k, ...]) of ∇²L(θ) by Lanczos on linearised HVPs.

    num_iters defaults to min(|θ|, 2k + 20).
    """
    m = min(tree_size(params), 2 * k + 20) if num_iters is None else int(num_iters)
    _, hvp_fn = linearized_hvp(loss_fn, params, batch, has_aux=has_aux)
    key_v0, key_restart = jax.random.split(key)
    v0 = tree_random_unit(key_v0, params)
    return lanczos(hvp_fn, v0, k, num_iters=m, key=key_restart)


def slq_quadrature(matvec: Callable, like, key, *, num_probes: int = 8, num_iters: int = 32):
    """(nodes [P, m], weights [P, m]): stochastic Lanczos quadrature of the spectral measure.

    For each Rademacher probe v/‖v‖, Lanczos gives T = SΘSᵀ and the quadrature
    (nodes Θ, weights S[0, :]²) of μ_v = Σ_i ⟨v, u_i⟩² δ_{λ_i}; averaging over probes
    estimates the spectral density (1/n) Σ_i δ_{λ_i}. Σ_i weights·nodes = vᵀAv/‖v‖².
    """
    m = min(int(num_iters), tree_size(like))

    def one_probe(probe_key):
        key_v, key_restart = jax.random.split(probe_key)
        v = tree_cast_like(tree_random_rademacher(key_v, like), like)
        alphas, betas, _ = lanczos_tridiag(matvec, v, m, key=key_restart)
        theta, s = _tridiag_eigh(alphas, betas)
        return theta, jnp.square(s[0])

    return jax.lax.map(one_probe, jax.random.split(key, num_probes))


def slq_density(
    matvec: Callable,
    like,
    key,
    *,
    num_probes: int = 8,
    num_iters: int = 32,
    num_points: int = 512,
    sigma: float | None = None,
):
    """(grid [num_points], density [num_points]): Gaussian-smoothed SLQ spectral density.

    density(x) = (1/P) Σ_p Σ_i w_pi N(x; θ_pi, σ²), which integrates to 1 over the grid
    (it spans the nodes ± 6σ); σ defaults to 1% of the node range. Its mean is the
    Hutchinson estimate of tr(A)/n.
    """
    nodes, weights = slq_quadrature(matvec, like, key, num_probes=num_probes, num_iters=num_iters)
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    span = jnp.maximum(hi - lo, jnp.finfo(nodes.dtype).eps * (1 + jnp.abs(hi)))
    width = 0.01 * span if sigma is None else jnp.asarray(sigma, nodes.dtype)
    grid = jnp.linspace(lo - 6 * width, hi + 6 * width, num_points)
    z = (grid[:, None] - nodes.reshape(-1)[None, :]) / width
    kernel = jnp.exp(-0.5 * z**2) / (width * jnp.sqrt(2 * jnp.pi))
    density = kernel @ weights.reshape(-1) / nodes.shape[0]
    return grid, density


def condition_number(psd_matvec: Callable, like, key, *, num_iters: int = 32):
    """(κ, λ_min, λ_max) of a PSD operator (Gauss–Newton, Fisher, feature covariance).

    From the extreme Ritz values of num_iters Lanczos steps: λ_max converges from below and
    λ_min from above, so κ = λ_max/λ_min is a lower bound that becomes exact at
    num_iters = dimension. Add a damping term to psd_matvec for singular operators.
    """
    m = min(int(num_iters), tree_size(like))
    key_v0, key_restart = jax.random.split(key)
    v0 = tree_cast_like(tree_random_unit(key_v0, like), like)
    alphas, betas, _ = lanczos_tridiag(psd_matvec, v0, m, key=key_restart)
    theta, _ = _tridiag_eigh(alphas, betas)
    lam_min, lam_max = theta[0], theta[-1]
    return lam_max / lam_min, lam_min, lam_max


def hessian_lipschitz(
    loss_fn: Callable,
    params,
    batch,
    delta: float,
    n_dirs: int,
    key,
    *,
    u=None,
    v=None,
    has_aux: bool = False,
):
    """max_i ‖H(θ + δu_i)v_i − H(θ)v_i‖ / δ over n_dirs random unit directions u_i, v_i.

    A lower estimate of the local Hessian-Lipschitz constant L_H on the ball of radius δ
    (L_H ≥ every ratio). Pass `u` and/or `v` (pytrees, normalised here) to fix a direction,
    e.g. u = v = SEAM's perturbation direction δ̂ for the constant Theorem 1 uses.
    """
    dtype = tree_acc_dtype(params)

    def unit(x):
        x = tree_cast(x, dtype)
        return tree_scale(x, 1.0 / tree_norm(x))

    def one(dir_key):
        key_u, key_v = jax.random.split(dir_key)
        u_i = unit(u) if u is not None else tree_random_unit(key_u, params, dtype)
        v_i = unit(v) if v is not None else tree_random_unit(key_v, params, dtype)
        moved = tree_cast_like(jax.tree.map(lambda p, d: p.astype(dtype) + delta * d, params, u_i), params)
        diff = tree_sub(
            tree_cast(hvp(loss_fn, moved, batch, v_i, has_aux=has_aux), dtype),
            tree_cast(hvp(loss_fn, params, batch, v_i, has_aux=has_aux), dtype),
        )
        return tree_norm(diff) / delta

    return jnp.max(jax.lax.map(one, jax.random.split(key, n_dirs)))


def seam_bound(eps, lipschitz_a, lipschitz_b, norm_a, norm_b, *, cos=None):
    """SEAM Theorem 1 (seed 000): ‖∇̂L_sd − ∇L_sd‖ ≤ (ε/2)(L_a^H/‖g_a‖ + L_b^H/‖g_b‖) + O(ε²).

    With `cos` = c the tighter form (ε/2)(1 − c²)(L_a^H/‖g_a‖ + L_b^H/‖g_b‖) is returned:
    the perturbation directions have ‖δ‖² = 1 − c², and the integral remainder
    (1/ε)∫₀^ε (H(θ+tδ) − H(θ))δ dt has norm ≤ L_H ε‖δ‖²/2 exactly (no O(ε²) term).
    """
    factor = 1.0 if cos is None else 1.0 - cos**2
    return 0.5 * eps * factor * (lipschitz_a / norm_a + lipschitz_b / norm_b)

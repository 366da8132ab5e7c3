import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxdefense.curvature import (
    condition_number,
    cosine_grad,
    hessian_lipschitz,
    hessian_top_eigs,
    hvp,
    lanczos,
    linearized_hvp,
    seam_bound,
    slq_density,
    slq_quadrature,
)


def test_lanczos_full_dimension_equals_eigh(mlp64):
    h, flat, unravel = mlp64.dense_hessian(mlp64.loss, mlp64.params, mlp64.batch_a)
    n = flat.size
    exact = np.linalg.eigvalsh(np.asarray(h))[::-1]
    v0 = unravel(jax.random.normal(jax.random.key(0), (n,), jnp.float64))

    @jax.jit
    def run(p, b, v):
        _, hvp_fn = linearized_hvp(mlp64.loss, p, b)
        return lanczos(hvp_fn, v, n)

    vals, vecs = run(mlp64.params, mlp64.batch_a, v0)
    scale = np.abs(exact).max()
    np.testing.assert_allclose(vals, exact, atol=1e-10 * scale)
    for i in range(3):
        vec = ravel_pytree(jax.tree.map(lambda x: x[i], vecs))[0]
        assert np.isclose(np.linalg.norm(vec), 1.0, atol=1e-10)
        assert np.linalg.norm(h @ vec - vals[i] * vec) < 1e-9 * scale


def test_hessian_top_eigs_partial_lanczos(mlp64):
    h, flat, _ = mlp64.dense_hessian(mlp64.loss, mlp64.params, mlp64.batch_a)
    exact = np.linalg.eigvalsh(np.asarray(h))[::-1][:3]
    vals, vecs = jax.jit(lambda p: hessian_top_eigs(mlp64.loss, p, mlp64.batch_a, 3, jax.random.key(1), num_iters=30))(
        mlp64.params
    )
    assert flat.size > 30
    np.testing.assert_allclose(vals, exact, rtol=1e-8)
    assert jax.tree.leaves(vecs)[0].shape[0] == 3


def test_slq_density_integrates_to_one_with_hutchinson_mean(mlp64):
    h, flat, unravel = mlp64.dense_hessian(mlp64.loss, mlp64.params, mlp64.batch_a)
    h = np.asarray(h)
    n, probes = flat.size, 64

    @jax.jit
    def run(p, b, key):
        _, hvp_fn = linearized_hvp(mlp64.loss, p, b)
        grid, density = slq_density(hvp_fn, p, key, num_probes=probes, num_iters=20)
        return grid, density, slq_quadrature(hvp_fn, p, key, num_probes=probes, num_iters=20)

    grid, density, (nodes, weights) = run(mlp64.params, mlp64.batch_a, jax.random.key(2))
    assert np.isclose(np.trapezoid(density, grid), 1.0, atol=1e-6)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-10)
    mean_density = np.trapezoid(grid * density, grid)
    mean_nodes = float(np.mean(np.sum(nodes * weights, axis=1)))
    assert np.isclose(mean_density, mean_nodes, rtol=1e-6, atol=1e-9)
    # Rademacher Hutchinson standard error of vᵀHv/n: sqrt(2 Σ_{i≠j} H_ij²)/n per probe.
    stderr = np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2))) / n / np.sqrt(probes)
    assert abs(mean_nodes - np.trace(h) / n) < 4 * stderr + 1e-12
    assert nodes.min() >= np.linalg.eigvalsh(h).min() - 1e-9  # Ritz values lie in the spectrum's hull


def test_condition_number_of_feature_covariance(x64):
    features = jax.random.normal(jax.random.key(3), (40, 6), jnp.float64) * jnp.array([3.0, 2.0, 1.0, 1.0, 0.5, 0.2])
    cov = features.T @ features / 40
    matvec = lambda v: {"w": cov @ v["w"]}
    run = jax.jit(condition_number, static_argnums=0, static_argnames="num_iters")
    kappa, lam_min, lam_max = run(matvec, {"w": jnp.zeros(6)}, jax.random.key(4), num_iters=6)
    eig = np.linalg.eigvalsh(np.asarray(cov))
    assert np.isclose(lam_max, eig[-1], rtol=1e-10) and np.isclose(lam_min, eig[0], rtol=1e-8)
    assert np.isclose(kappa, eig[-1] / eig[0], rtol=1e-8)
    kappa_short, _, _ = run(matvec, {"w": jnp.zeros(6)}, jax.random.key(4), num_iters=3)
    assert kappa_short <= kappa * (1 + 1e-10)  # Ritz extremes lie inside the spectrum


def test_hessian_lipschitz_zero_for_quadratic_exact_for_cubic(x64):
    a = jax.random.normal(jax.random.key(5), (5, 5), jnp.float64)
    quadratic = lambda p, b: 0.5 * p["x"] @ (a @ a.T) @ p["x"] + b * jnp.sum(p["x"])
    params = {"x": jnp.linspace(-1.0, 1.0, 5)}
    lip = jax.jit(hessian_lipschitz, static_argnums=(0, 4))
    assert lip(quadratic, params, 1.0, 0.1, 4, jax.random.key(6)) < 1e-12
    c = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    cubic = lambda p, b: jnp.sum(c * p["x"] ** 3) / 6 * b  # H = diag(c·x) ⇒ ΔH v = δ c·u·v
    u, v = {"x": jnp.array([1.0, 0, 1, 0, 1])}, {"x": jnp.array([1.0, 1, 1, 1, 1])}
    ratio = lip(cubic, params, 1.0, 0.1, 2, jax.random.key(7), u=u, v=v)
    expected = np.linalg.norm(c * u["x"] * v["x"]) / (np.linalg.norm(u["x"]) * np.linalg.norm(v["x"]))
    assert np.isclose(ratio, expected, rtol=1e-10)
    assert lip(cubic, params, 1.0, 0.1, 4, jax.random.key(8)) > 0.1


def test_seam_bound_holds_for_forward_estimator(mlp64):
    """Theorem 1 with L_H measured along the perturbation directions bounds the FD error."""
    m = mlp64

    @jax.jit
    def setup(p, ba, bb):
        cos, exact, aux = cosine_grad(m.loss, ba, m.loss, bb, p)
        ga, gb = jax.grad(m.loss)(p, ba), jax.grad(m.loss)(p, bb)
        unit = lambda g, n: jax.tree.map(lambda x: x / n, g)
        delta_a = jax.tree.map(lambda x, y: x - cos * y, unit(gb, aux["norm_b"]), unit(ga, aux["norm_a"]))
        delta_b = jax.tree.map(lambda x, y: x - cos * y, unit(ga, aux["norm_a"]), unit(gb, aux["norm_b"]))
        lip_a = hessian_lipschitz(m.loss, p, ba, 1e-4, 1, jax.random.key(9), u=delta_a, v=delta_a)
        lip_b = hessian_lipschitz(m.loss, p, bb, 1e-4, 1, jax.random.key(9), u=delta_b, v=delta_b)
        return cos, exact, aux, delta_a, lip_a, lip_b

    cos, exact, aux, delta_a, lip_a, lip_b = setup(m.params, m.batch_a, m.batch_b)
    forward = jax.jit(lambda p, ba, bb, eps: cosine_grad(m.loss, ba, m.loss, bb, p, estimator="forward", eps=eps)[1])
    for eps in (1e-2, 1e-3):
        est = forward(m.params, m.batch_a, m.batch_b, eps)
        observed = np.linalg.norm(m.flat(est) - m.flat(exact))
        tight = seam_bound(eps, lip_a, lip_b, aux["norm_a"], aux["norm_b"], cos=cos)
        loose = seam_bound(eps, lip_a, lip_b, aux["norm_a"], aux["norm_b"])
        assert observed <= tight * 1.05 and tight <= loose
        assert observed >= 0.05 * tight  # the bound is not vacuous at this scale
    # hvp-based Lipschitz ratio agrees with the definition
    moved = jax.tree.map(lambda p, d: p + 1e-4 * d / np.linalg.norm(m.flat(delta_a)), m.params, delta_a)
    dv = jax.tree.map(lambda x: x / np.linalg.norm(m.flat(delta_a)), delta_a)
    hvp_jit = jax.jit(lambda p, v: hvp(m.loss, p, m.batch_a, v))
    direct = np.linalg.norm(m.flat(hvp_jit(moved, dv)) - m.flat(hvp_jit(m.params, dv))) / 1e-4
    assert np.isclose(lip_a, direct, rtol=1e-8)

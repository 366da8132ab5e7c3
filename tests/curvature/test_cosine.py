import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxdefense.curvature import cosine_grad
from jaxdefense.errors import ConfigError


def _cos_of_grads(loss, batch_a, batch_b):
    def cos(p):
        ga, _ = ravel_pytree(jax.grad(loss)(p, batch_a))
        gb, _ = ravel_pytree(jax.grad(loss)(p, batch_b))
        return ga @ gb / (jnp.linalg.norm(ga) * jnp.linalg.norm(gb))

    return cos


_JITTED = {}


def _estimate(m, estimator, eps):
    """cosine_grad under jit, one compilation per estimator (ε is traced)."""
    if estimator not in _JITTED:
        _JITTED[estimator] = jax.jit(
            lambda p, ba, bb, eps: cosine_grad(m.loss, ba, m.loss, bb, p, estimator=estimator, eps=eps)
        )
    return _JITTED[estimator](m.params, m.batch_a, m.batch_b, eps)


def test_exact_equals_autodiff_of_cosine(mlp64):
    cos_fn = _cos_of_grads(mlp64.loss, mlp64.batch_a, mlp64.batch_b)
    cos, grad, aux = _estimate(mlp64, "exact", 0.0)
    ref_cos, ref_grad = jax.jit(jax.value_and_grad(cos_fn))(mlp64.params)
    assert np.isclose(cos, ref_cos, rtol=1e-13, atol=1e-15)
    assert mlp64.rel_err(grad, ref_grad) < 1e-10
    ga = jax.grad(mlp64.loss)(mlp64.params, mlp64.batch_a)
    assert np.isclose(aux["norm_a"], np.linalg.norm(mlp64.flat(ga)), rtol=1e-13)
    assert np.isclose(aux["loss_b"], mlp64.loss(mlp64.params, mlp64.batch_b), rtol=1e-13)
    via_jvp = jax.jit(lambda p, ba, bb: cosine_grad(mlp64.loss, ba, mlp64.loss, bb, p, exact_via="jvp")[1])
    assert mlp64.rel_err(via_jvp(mlp64.params, mlp64.batch_a, mlp64.batch_b), ref_grad) < 1e-10


def test_forward_is_the_official_seam_formula(mlp64):
    """θ_a = θ + ε(ĝ_b − cĝ_a), θ_b = θ + ε(ĝ_a − cĝ_b), c = ⟨g_a,g_b⟩/(‖g_a‖‖g_b‖+1e-8)."""
    eps = 1e-3
    flat, unravel = ravel_pytree(mlp64.params)
    grad = lambda f, b: ravel_pytree(jax.grad(mlp64.loss)(unravel(f), b))[0]
    ga, gb = grad(flat, mlp64.batch_a), grad(flat, mlp64.batch_b)
    na, nb = jnp.linalg.norm(ga), jnp.linalg.norm(gb)
    c = ga @ gb / (na * nb + 1e-8)
    ga_pert = grad(flat + eps * (gb / nb - c * ga / na), mlp64.batch_a)
    gb_pert = grad(flat + eps * (ga / na - c * gb / nb), mlp64.batch_b)
    official = ((ga_pert - ga) / na + (gb_pert - gb) / nb) / eps
    _, est, _ = _estimate(mlp64, "forward", eps)
    assert mlp64.rel_err(mlp64.flat(est), official) < 1e-9


def _loglog_slope(mlp64, estimator, eps_values):
    truth = _estimate(mlp64, "exact", 0.0)[1]
    errors = [mlp64.rel_err(_estimate(mlp64, estimator, eps)[1], truth) for eps in eps_values]
    return np.polyfit(np.log(eps_values), np.log(errors), 1)[0], errors


def test_forward_error_linear_central_quadratic_in_eps(mlp64):
    eps_values = np.array([3e-2, 1e-2, 3e-3, 1e-3])
    slope_fwd, err_fwd = _loglog_slope(mlp64, "forward", eps_values)
    slope_ctr, err_ctr = _loglog_slope(mlp64, "central", eps_values)
    assert abs(slope_fwd - 1.0) < 0.3, err_fwd
    assert abs(slope_ctr - 2.0) < 0.3, err_ctr
    assert all(c < f for c, f in zip(err_ctr, err_fwd))


def test_bf16_perturbation_in_float32_survives_rounding(mlp):
    """bf16 cannot hold θ + 1e-3·δ; forming the perturbed point in float32 fixes that."""
    params = mlp.make_params(jax.random.key(0), jnp.bfloat16)
    batch_a = mlp.make_batch(jax.random.key(1), jnp.float32)
    batch_b = mlp.make_batch(jax.random.key(2), jnp.float32, shift=0.7)
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
        truth = jax.jit(cosine_grad, static_argnums=(0, 2))(mlp.loss, to64(batch_a), mlp.loss, to64(batch_b), to64(params))[1]
        truth = np.asarray(mlp.flat(truth))
    run = jax.jit(cosine_grad, static_argnums=(0, 2), static_argnames=("estimator", "perturb_dtype"))
    _, plain, _ = run(mlp.loss, batch_a, mlp.loss, batch_b, params, estimator="forward", eps=1e-3)
    _, widened, _ = run(
        mlp.loss, batch_a, mlp.loss, batch_b, params, estimator="forward", eps=1e-3, perturb_dtype=jnp.float32
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(plain))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(widened))
    err_plain = mlp.rel_err(np.asarray(mlp.flat(plain), np.float64), truth)
    err_widened = mlp.rel_err(np.asarray(mlp.flat(widened), np.float64), truth)
    assert err_plain > 0.3
    assert err_widened < 0.02
    _, exact_bf16, _ = run(mlp.loss, batch_a, mlp.loss, batch_b, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(exact_bf16))
    assert mlp.rel_err(np.asarray(mlp.flat(exact_bf16), np.float64), truth) < 0.05


def test_has_aux_and_bad_estimator(mlp64):
    def loss_aux(p, b):
        value = mlp64.loss(p, b)
        return value, {"value": value}

    run = jax.jit(lambda p, ba, bb: cosine_grad(loss_aux, ba, loss_aux, bb, p, has_aux=True))
    cos, grad, aux = run(mlp64.params, mlp64.batch_a, mlp64.batch_b)
    assert np.isclose(aux["aux_a"]["value"], aux["loss_a"])
    assert mlp64.rel_err(grad, _estimate(mlp64, "exact", 0.0)[1]) < 1e-14
    with pytest.raises(ConfigError, match="estimator"):
        cosine_grad(mlp64.loss, mlp64.batch_a, mlp64.loss, mlp64.batch_b, mlp64.params, estimator="backward")

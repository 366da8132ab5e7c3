import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxdefense.curvature import HVP_MODES, gnvp, hvp, linearize_grad, linearized_hvp
from jaxdefense.errors import ConfigError


def _random_like(key, params):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


@pytest.mark.parametrize("mode", HVP_MODES)
def test_hvp_modes_equal_dense_hessian(mlp64, mode):
    h, _, _ = mlp64.dense_hessian(mlp64.loss, mlp64.params, mlp64.batch_a)
    v = _random_like(jax.random.key(1), mlp64.params)
    out = jax.jit(lambda p, b, v: hvp(mlp64.loss, p, b, v, mode=mode))(mlp64.params, mlp64.batch_a, v)
    assert mlp64.rel_err(mlp64.flat(out), h @ mlp64.flat(v)) < 1e-10


def test_linearized_operator_many_products(mlp64):
    h, _, unravel = mlp64.dense_hessian(mlp64.loss, mlp64.params, mlp64.batch_a)
    grad, hvp_fn = linearized_hvp(mlp64.loss, mlp64.params, mlp64.batch_a)
    assert mlp64.rel_err(grad, jax.grad(mlp64.loss)(mlp64.params, mlp64.batch_a)) < 1e-12
    for i in range(3):
        v = _random_like(jax.random.key(10 + i), mlp64.params)
        assert mlp64.rel_err(mlp64.flat(hvp_fn(v)), h @ mlp64.flat(v)) < 1e-10


def test_linearize_grad_returns_value_and_aux(mlp64):
    def loss_with_aux(p, b):
        return mlp64.loss(p, b), {"twice": 2 * mlp64.loss(p, b)}

    value, grad, hvp_fn, aux = linearize_grad(loss_with_aux, mlp64.params, mlp64.batch_a, has_aux=True)
    assert np.isclose(value, mlp64.loss(mlp64.params, mlp64.batch_a), rtol=1e-14)
    assert np.isclose(aux["twice"], 2 * value, rtol=1e-14)
    v = _random_like(jax.random.key(3), mlp64.params)
    ref = hvp(mlp64.loss, mlp64.params, mlp64.batch_a, v)
    assert mlp64.rel_err(hvp_fn(v), ref) < 1e-12
    assert mlp64.rel_err(hvp(loss_with_aux, mlp64.params, mlp64.batch_a, v, has_aux=True), ref) < 1e-14


def test_gnvp_equals_dense_jacobian_form(mlp64):
    batch = mlp64.batch_a
    flat, unravel = ravel_pytree(mlp64.params)
    logits = mlp64.logits(mlp64.params, batch)
    jac = jax.jacobian(lambda f: mlp64.logits(unravel(f), batch))(flat)  # [N, V, P]
    probs = jax.nn.softmax(logits, axis=-1)
    weights = batch["mask"] / jnp.sum(batch["mask"])
    h_ce = weights[:, None, None] * (jax.vmap(jnp.diag)(probs) - probs[:, :, None] * probs[:, None, :])
    gn = jnp.einsum("nvp,nvw,nwq->pq", jac, h_ce, jac)
    v = _random_like(jax.random.key(4), mlp64.params)
    out = gnvp(mlp64.logits, mlp64.params, batch, v, mask=batch["mask"])
    assert mlp64.rel_err(mlp64.flat(out), gn @ mlp64.flat(v)) < 1e-10


def test_gnvp_equals_hessian_for_logits_linear_in_params(mlp64):
    """For a linear softmax model the CE Hessian is exactly its Gauss–Newton matrix."""
    batch = mlp64.batch_a
    params = {"w2": mlp64.params["w2"][:4], "b2": mlp64.params["b2"]}
    linear_logits = lambda p, b: b["x"] @ p["w2"] + p["b2"]

    def loss(p, b):
        logp = jax.nn.log_softmax(linear_logits(p, b), axis=-1)
        nll = -jnp.take_along_axis(logp, b["y"][:, None], axis=-1)[:, 0]
        return jnp.sum(nll * b["mask"]) / jnp.sum(b["mask"])

    v = _random_like(jax.random.key(5), params)
    gn = gnvp(linear_logits, params, batch, v, mask=batch["mask"])
    assert mlp64.rel_err(gn, hvp(loss, params, batch, v)) < 1e-12


def test_hvp_float32_close_to_float64(mlp):
    params32 = mlp.make_params(jax.random.key(0), jnp.float32)
    batch32 = mlp.make_batch(jax.random.key(1), jnp.float32)
    v32 = _random_like(jax.random.key(2), params32)
    out32 = hvp(mlp.loss, params32, batch32, v32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out32))
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if x.dtype == jnp.float32 else x, t)
        out64 = hvp(mlp.loss, to64(params32), to64(batch32), to64(v32))
        assert mlp.rel_err(to64(out32), out64) < 1e-5


def test_bad_mode_raises(mlp64):
    with pytest.raises(ConfigError, match="hvp mode"):
        hvp(mlp64.loss, mlp64.params, mlp64.batch_a, mlp64.params, mode="fwd_fwd")

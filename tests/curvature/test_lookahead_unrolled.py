import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from jaxdefense.curvature import lookahead_grad, unrolled_grad
from jaxdefense.errors import ConfigError

ALPHA = 0.3


@pytest.mark.parametrize("normalize", [False, True])
def test_lookahead_exact_equals_autodiff_through_the_step(mlp64, normalize):
    loss = mlp64.loss

    def objective(p):
        g, _ = ravel_pytree(jax.grad(loss)(p, mlp64.batch_a))
        flat, unravel = ravel_pytree(p)
        step = g / (jnp.linalg.norm(g) + 1e-7) if normalize else g
        return loss(unravel(flat - ALPHA * step), mlp64.batch_b)

    ref_value, ref_grad = jax.jit(jax.value_and_grad(objective))(mlp64.params)
    run = jax.jit(
        lambda p: lookahead_grad(loss, mlp64.batch_b, loss, mlp64.batch_a, p, ALPHA, normalize=normalize, order="exact")
    )
    value, grad, aux = run(mlp64.params)
    assert np.isclose(value, ref_value, rtol=1e-13)
    assert mlp64.rel_err(grad, ref_grad) < 1e-10
    first = jax.jit(
        lambda p: lookahead_grad(loss, mlp64.batch_b, loss, mlp64.batch_a, p, ALPHA, normalize=normalize)
    )(mlp64.params)[1]
    assert mlp64.rel_err(first, ref_grad) > 1e-4  # the Hessian term matters here


def test_lookahead_first_order_is_the_official_ctrap_formula(mlp64):
    """CTRAP/Booster code: θ' = θ − α g_h/(‖g_h‖+1e-7), gradient ∇L_out(θ') taken as ∇_θ."""
    flat, unravel = ravel_pytree(mlp64.params)
    g_h = ravel_pytree(jax.grad(mlp64.loss)(mlp64.params, mlp64.batch_a))[0]
    shifted = unravel(flat - ALPHA * g_h / (jnp.linalg.norm(g_h) + 1e-7))
    ref = jax.grad(mlp64.loss)(shifted, mlp64.batch_b)
    value, grad, aux = lookahead_grad(
        mlp64.loss, mlp64.batch_b, mlp64.loss, mlp64.batch_a, mlp64.params, ALPHA, normalize=True
    )
    assert mlp64.rel_err(grad, ref) < 1e-13
    assert np.isclose(aux["step_grad_norm"], jnp.linalg.norm(g_h), rtol=1e-13)
    with pytest.raises(ConfigError, match="order"):
        lookahead_grad(mlp64.loss, mlp64.batch_b, mlp64.loss, mlp64.batch_a, mlp64.params, ALPHA, order="second")


def _stack(batches):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def _reference_objective(loss, inner, outer_batch, steps, tx):
    """Python-loop inner fine-tuning with an optax optimiser (independent of unrolled_grad)."""

    def objective(p):
        state = tx.init(p)
        for k in range(steps):
            g = jax.grad(loss)(p, inner[k % len(inner)])
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return loss(p, outer_batch), p

    return objective


@pytest.mark.parametrize(
    "optimizer,tx,lr,steps",
    [("sgd", optax.sgd(0.5), 0.5, 3), ("adam", optax.adam(0.05), 0.05, 3)],
)
def test_unrolled_exact_and_first_order_match_python_loop(mlp64, optimizer, tx, lr, steps):
    inner = [mlp64.batch_a, mlp64.make_batch(jax.random.key(7), jnp.float64, shift=-0.4)]
    objective = _reference_objective(mlp64.loss, inner, mlp64.batch_b, steps, tx)
    (ref_value, adapted), ref_grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(mlp64.params)
    fo_ref = jax.grad(mlp64.loss)(adapted, mlp64.batch_b)

    def run(first_order):
        fn = lambda p, ib: unrolled_grad(
            mlp64.loss, mlp64.batch_b, mlp64.loss, ib, p, steps=steps, lr=lr, optimizer=optimizer, first_order=first_order
        )
        return jax.jit(fn)(mlp64.params, _stack(inner))

    value, grad, aux = run(False)
    assert np.isclose(value, ref_value, rtol=1e-12)
    assert mlp64.rel_err(grad, ref_grad) < 1e-10
    assert aux["inner_losses"].shape == (steps,)
    assert np.isclose(aux["inner_losses"][0], mlp64.loss(mlp64.params, inner[0]), rtol=1e-13)
    fo_value, fo_grad, _ = run(True)
    assert np.isclose(fo_value, ref_value, rtol=1e-12)
    assert mlp64.rel_err(fo_grad, fo_ref) < 1e-12
    assert mlp64.rel_err(fo_grad, ref_grad) > 1e-3  # first order is an approximation here

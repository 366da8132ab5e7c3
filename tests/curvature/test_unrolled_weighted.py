"""unrolled_grad's AdamW weight decay, per-step outer weights and segmented remat (TAR, MLAC), against
hand-written float64 references; the exact pass's planned memory grows sublinearly in K."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdefense.curvature.unrolled import unrolled_grad, unrolled_loss
from jaxdefense.errors import ConfigError


def _stack(batches):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def _hand_adamw(p, g, m, v, k, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """One torch/optax AdamW step written out: decoupled decay on the pre-step weights."""
    m = jax.tree.map(lambda a, d: b1 * a + (1 - b1) * d, m, g)
    v = jax.tree.map(lambda a, d: b2 * a + (1 - b2) * d * d, v, g)
    p = jax.tree.map(lambda x, a, c: x - lr * (a / (1 - b1 ** (k + 1)) / (jnp.sqrt(c / (1 - b2 ** (k + 1))) + eps)
                                               + wd * x), p, m, v)
    return p, m, v


def _inner(mlp64):
    return [mlp64.batch_a, mlp64.make_batch(jax.random.key(7), jnp.float64, shift=-0.4)]


def test_adamw_weight_decay_matches_optax_and_a_hand_reference(mlp64):
    lr, wd, steps = 0.05, 0.3, 4
    inner = _inner(mlp64)

    def hand(p):
        m = v = jax.tree.map(jnp.zeros_like, p)
        for k in range(steps):
            p, m, v = _hand_adamw(p, jax.grad(mlp64.loss)(p, inner[k % 2]), m, v, k, lr, wd)
        return mlp64.loss(p, mlp64.batch_b), p

    def with_optax(p):
        tx = optax.adamw(lr, weight_decay=wd)
        state = tx.init(p)
        for k in range(steps):
            updates, state = tx.update(jax.grad(mlp64.loss)(p, inner[k % 2]), state, p)
            p = optax.apply_updates(p, updates)
        return p

    (ref_value, adapted), ref_grad = jax.jit(jax.value_and_grad(hand, has_aux=True))(mlp64.params)
    assert mlp64.rel_err(with_optax(mlp64.params), adapted) < 1e-13
    run = jax.jit(lambda p, first: unrolled_grad(mlp64.loss, mlp64.batch_b, mlp64.loss, _stack(inner), p, steps=steps,
                                                 lr=lr, optimizer="adamw", weight_decay=wd, first_order=first),
                  static_argnums=1)
    value, grad, _ = run(mlp64.params, False)
    assert np.isclose(value, ref_value, rtol=1e-12)
    assert mlp64.rel_err(grad, ref_grad) < 1e-10
    _, fo_grad, _ = run(mlp64.params, True)
    assert mlp64.rel_err(fo_grad, jax.grad(mlp64.loss)(adapted, mlp64.batch_b)) < 1e-12
    no_decay = unrolled_grad(mlp64.loss, mlp64.batch_b, mlp64.loss, _stack(inner), mlp64.params, steps=steps, lr=lr,
                             optimizer="adam")[1]
    assert mlp64.rel_err(no_decay, ref_grad) > 1e-3  # the decay term matters here


@pytest.mark.slow  # ~20 s idle; AdamW and segmentation stay covered by the default suite
def test_sgd_weight_decay_and_weighted_outer_losses(mlp64):
    """F = Σ_k w_k L_out(θ_k) with SGD + decay θ ← θ − lr(g + λθ); exact = autodiff of the Python loop,
    first order = Σ_k w_k ∇L_out(θ_k) with θ_k constant; zero weights are not evaluated."""
    lr, wd, steps = 0.4, 0.2, 5
    weights = (0.0, 0.5, 0.0, 1.5, 0.0, 2.0)
    inner = _inner(mlp64)

    def trajectory(p):
        out = [p]
        for k in range(steps):
            g = jax.grad(mlp64.loss)(p, inner[k % 2])
            p = jax.tree.map(lambda x, d: x - lr * (d + wd * x), p, g)
            out.append(p)
        return out

    def objective(p):
        return sum(w * mlp64.loss(t, mlp64.batch_b) for w, t in zip(weights, trajectory(p)))

    ref_value, ref_grad = jax.jit(jax.value_and_grad(objective))(mlp64.params)
    thetas = trajectory(mlp64.params)
    fo_ref = jax.tree.map(lambda *gs: sum(w * g for w, g in zip(weights, gs)),
                          *[jax.grad(mlp64.loss)(t, mlp64.batch_b) for t in thetas])
    for segment in (1, 2, 3):
        run = jax.jit(lambda p, first, seg=segment: unrolled_grad(
            mlp64.loss, mlp64.batch_b, mlp64.loss, _stack(inner), p, steps=steps, lr=lr, weight_decay=wd,
            outer_weights=weights, first_order=first, remat_segment=seg), static_argnums=1)
        value, grad, aux = run(mlp64.params, False)
        assert np.isclose(value, ref_value, rtol=1e-12)
        assert mlp64.rel_err(grad, ref_grad) < 1e-10, segment
    fo_value, fo_grad, fo_aux = run(mlp64.params, True)
    assert np.isclose(fo_value, ref_value, rtol=1e-12)
    assert mlp64.rel_err(fo_grad, fo_ref) < 1e-12
    losses = [float(mlp64.loss(t, mlp64.batch_b)) for t in thetas]
    for out in (aux["outer_losses"], fo_aux["outer_losses"]):
        np.testing.assert_allclose(out, [x if w else 0.0 for w, x in zip(weights, losses)], rtol=1e-12)
    lr_grad = jax.grad(lambda s: unrolled_loss(mlp64.loss, mlp64.batch_b, mlp64.loss, _stack(inner), mlp64.params,
                                               steps=steps, lr=s, weight_decay=wd, outer_weights=weights)[0])(lr)
    eps = 1e-6
    fd = [(unrolled_loss(mlp64.loss, mlp64.batch_b, mlp64.loss, _stack(inner), mlp64.params, steps=steps, lr=lr + d,
                         weight_decay=wd, outer_weights=weights)[0]) for d in (eps, -eps)]
    assert np.isclose(lr_grad, (fd[0] - fd[1]) / (2 * eps), rtol=1e-6)
    with pytest.raises(ConfigError, match="outer_weights"):
        unrolled_grad(mlp64.loss, mlp64.batch_b, mlp64.loss, _stack(inner), mlp64.params, steps=steps, lr=lr,
                      outer_weights=(1.0, 2.0))


@pytest.mark.slow
def test_exact_unrolled_memory_is_sublinear_in_k():
    """XLA's planned temp memory of the exact step on the tiny transformer (Adam, batch 4 × 32): K = 16
    stays within 2× of K = 2 with the default √K segments; a flat scan (remat_segment=1) grows by about
    one (θ, m, v) carry per step, the segmented one by about 2√K carries."""
    from jaxdefense.models import init_params, lm_loss, named_config

    cfg = named_config("tiny")
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(3, cfg.vocab_size, (4, 32)), jnp.int32),
             "attention_mask": jnp.ones((4, 32), jnp.int32), "loss_mask": jnp.ones((4, 32), jnp.float32)}
    loss = lambda p, b: lm_loss(cfg, p, b)  # noqa: E731
    inner = jax.tree.map(lambda x: x[None], batch)

    def temp_bytes(steps, segment):
        fn = lambda p: unrolled_grad(loss, batch, loss, inner, p, steps=steps, lr=1e-3, optimizer="adam",  # noqa: E731
                                     remat_segment=segment)[1]
        return jax.jit(fn).lower(params).compile().memory_analysis().temp_size_in_bytes

    carry = 3 * sum(x.size * 4 for x in jax.tree.leaves(params))
    seg2, seg16 = temp_bytes(2, None), temp_bytes(16, None)
    flat16 = temp_bytes(16, 1)
    assert seg16 < 2 * seg2, (seg2, seg16, flat16)
    assert flat16 - seg2 > 10 * carry, (seg2, seg16, flat16, carry)  # what the segments save
    assert seg16 - seg2 < 8 * carry, (seg2, seg16, flat16, carry)

"""The curvature functions on the tiny decoder (jaxdefense.models), float64 ground truth."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.curvature import cosine_grad, gnvp, lookahead_grad, tree_vdot
from jaxdefense.models import forward, init_params, lm_loss, named_config

CFG = named_config("tiny", vocab_size=64)


def _batch(seed, low, high, b=2, t=8):
    ids = np.random.default_rng(seed).integers(low, high, size=(b, t))
    loss_mask = np.ones((b, t), np.float32)
    loss_mask[:, :2] = 0.0
    attention = np.ones((b, t), np.int32)
    attention[1, :2] = 0  # left padding in the second row
    return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(attention),
            "loss_mask": jnp.asarray(loss_mask)}


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_tiny_decoder_exact_second_order(x64):
    params = init_params(CFG, jax.random.key(0), dtype=jnp.float64)
    params = jax.tree.map(lambda x: x * 20 if x.ndim == 3 else x, params)  # larger weights, stronger curvature
    batch_a, batch_b = _batch(1, 0, 32), _batch(2, 32, 64)
    loss = lambda p, b: lm_loss(CFG, p, b)
    logits = lambda p, b: forward(CFG, p, b["input_ids"], attention_mask=b["attention_mask"])[:, :-1]

    def cos_direct(p):
        ga, gb = _flatten(jax.grad(loss)(p, batch_a)), _flatten(jax.grad(loss)(p, batch_b))
        return ga @ gb / (jnp.linalg.norm(ga) * jnp.linalg.norm(gb))

    def step_objective(p):
        g = jax.grad(loss)(p, batch_a)
        n = jnp.sqrt(tree_vdot(g, g))
        return loss(jax.tree.map(lambda x, y: x - 0.05 * y / (n + 1e-7), p, g), batch_b)

    @jax.jit
    def run(p, u, w):
        return {
            "cos_exact": cosine_grad(loss, batch_a, loss, batch_b, p),
            "cos_direct": jax.value_and_grad(cos_direct)(p),
            "lookahead": lookahead_grad(loss, batch_b, loss, batch_a, p, 0.05, normalize=True, order="exact")[1],
            "lookahead_direct": jax.grad(step_objective)(p),
            "gn_u": gnvp(logits, p, batch_a, u, mask=batch_a["loss_mask"][:, 1:]),
            "gn_w": gnvp(logits, p, batch_a, w, mask=batch_a["loss_mask"][:, 1:]),
        }

    u = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
    w = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
    out = run(params, u, w)
    rel = lambda a, b: np.linalg.norm(_flat(a) - _flat(b)) / np.linalg.norm(_flat(b))

    cos, grad, _ = out["cos_exact"]
    ref_cos, ref_grad = out["cos_direct"]
    assert abs(cos - ref_cos) < 1e-12 and abs(cos) < 0.99
    assert rel(grad, ref_grad) < 1e-10
    assert rel(out["lookahead"], out["lookahead_direct"]) < 1e-10
    # Gauss–Newton: symmetric and positive semi-definite.
    uGw, wGu = float(_flat(u) @ _flat(out["gn_w"])), float(_flat(w) @ _flat(out["gn_u"]))
    assert abs(uGw - wGu) < 1e-10 * abs(uGw)
    assert float(_flat(u) @ _flat(out["gn_u"])) > 0


def _flatten(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])

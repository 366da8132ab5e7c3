"""GRPO pure functions against hand computations (numpy, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense.rl.grpo import entropy_of_logits, group_advantages, grpo_loss, k3_kl, kl_in_reward, policy_loss
from jaxdefense.rl.rewards import entropy_reward



@pytest.fixture(autouse=True, scope="module")
def _float64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)

B, K, T, V = 2, 3, 5, 7
CLIP, BETA = 0.2, 0.3


def _case(seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(B * K, T, V))
    labels = rng.integers(0, V, (B * K, T))
    weights = (rng.random((B * K, T)) > 0.3).astype(np.float64)
    weights[:, 0] = 1.0
    ref = rng.normal(size=(B * K, T)) * 0.5 - 2.0
    old = rng.normal(size=(B * K, T)) * 0.3 - 2.0
    rewards = rng.normal(size=(B * K,))
    return theta, labels, weights, ref, old, rewards


def _logp(theta, labels):
    return jnp.take_along_axis(jax.nn.log_softmax(theta, -1), labels[..., None], -1)[..., 0]


def _np_logp(theta, labels):
    z = theta - theta.max(-1, keepdims=True)
    lsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(lsm, labels[..., None], -1)[..., 0], np.exp(lsm)


def test_advantages_hand_and_equal_groups():
    r = np.array([1.0, 2.0, 4.0, 3.0, 3.0, 3.0])
    a = np.asarray(group_advantages(r, 3))
    g = r[:3]
    np.testing.assert_allclose(a[:3], (g - g.mean()) / (g.std(ddof=1) + 1e-6), rtol=1e-5)
    assert np.all(a[3:] == 0.0)
    np.testing.assert_allclose(np.asarray(group_advantages(r, 3, scale=False))[:3], g - g.mean(), rtol=1e-5)


def test_loss_and_gradient_equal_hand_computation():
    theta, labels, w, ref, old, rewards = _case()
    adv = np.asarray(group_advantages(rewards, K), np.float64)

    def loss(t):
        return grpo_loss(_logp(t, labels), old, ref, adv, w, clip_ratio=CLIP, kl_coef=BETA)[0]

    value, grad = jax.value_and_grad(loss)(jnp.asarray(theta))
    lp, p = _np_logp(theta, labels)
    ratio = np.exp(lp - old)
    a = adv[:, None]
    un, cl = -a * ratio, -a * np.clip(ratio, 1 - CLIP, 1 + CLIP)
    d = ref - lp
    kl = np.exp(d) - d - 1
    assert kl.max() < 10  # inside the clamp
    per = np.maximum(un, cl) + BETA * kl
    np.testing.assert_allclose(float(value), (per * w).sum() / w.sum(), rtol=1e-10)
    # d per / d logp: −A·ρ where the unclipped term is the max (else 0: the clip is constant), β(1 − e^d) for KL.
    dpg = np.where(un >= cl, -a * ratio, 0.0)
    coeff = (dpg + BETA * (1 - np.exp(d))) * w / w.sum()
    onehot = np.eye(V)[labels]
    np.testing.assert_allclose(np.asarray(grad), coeff[..., None] * (onehot - p), rtol=1e-8, atol=1e-12)
    assert 0 < float(policy_loss(jnp.asarray(lp), old, adv, w, CLIP)[1]["clip_frac"]) < 1  # both branches used


def test_first_iteration_ratio_is_one_and_clip_is_inactive():
    theta, labels, w, ref, _, rewards = _case(1)
    adv = group_advantages(rewards, K)
    old = _logp(jnp.asarray(theta), labels)

    def loss(t, clip):
        lp = _logp(t, labels)
        return policy_loss(lp, jax.lax.stop_gradient(old), adv, w, clip)

    (lc, sc), gc = jax.value_and_grad(lambda t: loss(t, CLIP), has_aux=True)(jnp.asarray(theta))
    (lu, _), gu = jax.value_and_grad(lambda t: loss(t, None), has_aux=True)(jnp.asarray(theta))
    assert float(sc["ratio_mean"]) == 1.0 and float(sc["clip_frac"]) == 0.0
    assert float(lc) == float(lu)
    np.testing.assert_array_equal(np.asarray(gc), np.asarray(gu))


def test_kl_is_zero_at_the_reference():
    theta, labels, w, _, _, rewards = _case(2)
    lp = _logp(jnp.asarray(theta), labels)
    assert np.all(np.asarray(k3_kl(lp, lp)) == 0.0)
    _, stats = grpo_loss(lp, lp, lp, group_advantages(rewards, K), w, kl_coef=BETA)
    assert float(stats["kl"]) == 0.0
    np.testing.assert_array_equal(np.asarray(kl_in_reward(rewards, lp, lp, w, BETA)), rewards)
    assert np.all(np.asarray(k3_kl(lp, lp - 0.5)) > 0)


def test_entropy_reward_equals_numpy():
    theta, _, w, *_ = _case(3)
    ent = np.asarray(entropy_of_logits(jnp.asarray(theta)))
    z = theta - theta.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    h = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(ent, h, rtol=1e-5)
    r = entropy_reward(None, None, {"entropy": ent, "weights": w})
    np.testing.assert_allclose(r, -(h * w).sum(1) / w.sum(1), rtol=1e-5)
    assert r.shape == (B * K,)


@pytest.mark.parametrize("k", [1, 4])
def test_advantage_shapes(k):
    r = np.arange(8.0)
    a = np.asarray(group_advantages(r, k))
    assert a.shape == (8,) and np.isfinite(a).all()

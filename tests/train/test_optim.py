"""The one optimiser builder: schedules at hyperparameters ≠ 1 and clipping."""

import jax.numpy as jnp
import optax
import pytest

from jaxdefense import config as C
from jaxdefense.train.optim import learning_rate, make_optimizer


def _lrs(section, steps):
    opt = make_optimizer(section, steps)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    out = []
    for _ in range(steps):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        out.append(-float(updates["w"]))
    return out


def test_linear_schedule_with_warmup_and_floor():
    sec = C.OptimizerSection(name="sgd", lr=0.8, schedule="linear", warmup_steps=2, final_lr_fraction=0.25, clip=None)
    # warm-up 0 → 0.8 over 2 steps, then linear 0.8 → 0.2 over the remaining 4
    assert _lrs(sec, 6) == pytest.approx([0.0, 0.4, 0.8, 0.65, 0.5, 0.35])


def test_cosine_equals_optax_warmup_cosine():
    sec = C.OptimizerSection(lr=3e-4, schedule="cosine", warmup_steps=10, final_lr_fraction=0.1)
    ref = optax.warmup_cosine_decay_schedule(0.0, 3e-4, 10, 100, 3e-5)
    got = learning_rate(sec, 100)
    assert [float(got(i)) for i in (0, 5, 10, 50, 99)] == pytest.approx([float(ref(i)) for i in (0, 5, 10, 50, 99)])


def test_clip_bounds_the_update_norm():
    sec = C.OptimizerSection(name="sgd", lr=1.0, clip=0.5)
    opt = make_optimizer(sec, 1)
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    updates, _ = opt.update({"a": jnp.full(3, 3.0), "b": jnp.full(2, 4.0)}, opt.init(params), params)
    norm = float(jnp.sqrt(sum(jnp.sum(u ** 2) for u in updates.values())))
    assert norm == pytest.approx(0.5, rel=1e-6)

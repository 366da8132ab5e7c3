"""Shared tiny model, synthetic streams and jitted pieces for the training tests
(imported as a module: pytest puts tests/train on sys.path)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdefense.models import init_params, named_config
from jaxdefense.train import sft_grad

TINY = named_config("tiny")
SFT = sft_grad(TINY)
ADAMW = optax.adamw(3e-3)


class CountingStream:
    """Rows that count up mod 64 from a random start: next token = token + 1 (learnable)."""

    def __init__(self, seed=0, batch_size=8, seq_len=32):
        self.seed, self.batch_size, self.seq_len = seed, batch_size, seq_len

    def batch_at(self, step):
        rng = np.random.default_rng([self.seed, step])
        start = rng.integers(0, 64, (self.batch_size, 1))
        ids = (3 + (start + np.arange(self.seq_len)) % 64).astype(np.int32)
        mask = np.ones_like(ids)
        loss_mask = np.ones(ids.shape, np.float32)
        loss_mask[:, 0] = 0
        return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


class PoisonedStream(CountingStream):
    """CountingStream whose loss_mask is NaN at step `bad_step` (the loss becomes NaN there)."""

    def __init__(self, bad_step, **kw):
        super().__init__(**kw)
        self.bad_step = bad_step

    def batch_at(self, step):
        batch = super().batch_at(step)
        if step == self.bad_step:
            batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
        return batch


@functools.cache
def tiny_params():
    return jax.jit(init_params, static_argnums=0)(TINY, jax.random.key(0))


@functools.cache
def tiny_grads_jit():
    """Single-device jitted SFT grads of the tiny model (shared reference)."""
    return jax.jit(lambda p, b: SFT(p, b, jax.random.key(0), None))


def toy_problem():
    """Model-free params/grad_fn (compiles in milliseconds): loss = mean((w·x − y)²)."""
    params = {"w": np.zeros((4,), np.float32), "b": np.zeros((), np.float32)}

    def grad_fn(params, batches, key, frozen):
        del frozen
        x, y = batches["toy"]["x"], batches["toy"]["y"]

        def loss(p):
            return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        return grads, {"loss": value, "u": jax.random.uniform(key)}

    return params, grad_fn


class ToyStream:
    def batch_at(self, step):
        rng = np.random.default_rng(step)
        x = rng.normal(size=(8, 4)).astype(np.float32)
        return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 1.0).astype(np.float32)}

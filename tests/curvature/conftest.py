"""A tiny tanh MLP classifier and dense float64 references for the curvature tests."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree


def mlp_logits(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def mlp_loss(params, batch):
    """Mean cross-entropy over rows weighted by batch["mask"]."""
    logp = jax.nn.log_softmax(mlp_logits(params, batch), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]
    return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])


def make_params(key, dtype, d_in=4, d_hidden=6, d_out=3):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "w1": (jax.random.normal(k1, (d_in, d_hidden)) * 0.8).astype(dtype),
        "b1": (jax.random.normal(k2, (d_hidden,)) * 0.3).astype(dtype),
        "w2": (jax.random.normal(k3, (d_hidden, d_out)) * 0.8).astype(dtype),
        "b2": (jax.random.normal(k4, (d_out,)) * 0.3).astype(dtype),
    }


def make_batch(key, dtype, n=8, d_in=4, d_out=3, shift=0.0):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, d_in)) + shift
    y = jax.random.randint(ky, (n,), 0, d_out)
    mask = jnp.ones((n,)).at[-1].set(0.0)
    return {"x": x.astype(dtype), "y": y, "mask": mask.astype(dtype)}


def dense_hessian(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    return jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat), flat, unravel


def flat(tree):
    return ravel_pytree(tree)[0]


def rel_err(a, b):
    a, b = np.asarray(flat(a) if isinstance(a, dict) else a), np.asarray(flat(b) if isinstance(b, dict) else b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def mlp():
    return SimpleNamespace(
        logits=mlp_logits,
        loss=mlp_loss,
        make_params=make_params,
        make_batch=make_batch,
        dense_hessian=dense_hessian,
        flat=flat,
        rel_err=rel_err,
    )


@pytest.fixture
def mlp64(x64, mlp):
    """float64 params and two distinct batches (a: centred inputs, b: shifted inputs)."""
    key = jax.random.key(0)
    kp, ka, kb = jax.random.split(key, 3)
    return SimpleNamespace(
        params=make_params(kp, jnp.float64),
        batch_a=make_batch(ka, jnp.float64),
        batch_b=make_batch(kb, jnp.float64, shift=0.7),
        **vars(mlp),
    )

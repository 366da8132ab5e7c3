"""Activations are sharded, not only the weights: per-device memory falls with the device count,
layer-boundary activations carry the batch split, and sharded numerics equal one device's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdefense.models import decoder, init_params, lm_loss, named_config
from jaxdefense.models.sharding_rules import RESIDUAL, constrain
from jaxdefense.train import sharding as shd
from jaxdefense.train.loop import make_step, sft_grad

# Wide enough that activations, not params, dominate the step's temporaries.
CFG = named_config("tiny", num_layers=2)


@pytest.fixture(scope="module", autouse=True)
def _eight_devices():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 simulated CPU devices from tests/conftest.py")


def _abstract_batch(b, t):
    return {"train": {"input_ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
                      "attention_mask": jax.ShapeDtypeStruct((b, t), jnp.int32),
                      "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32)}}


def _batch(b, t, key=1, pad=3):
    ids = jax.random.randint(jax.random.key(key), (b, t), 3, CFG.vocab_size)
    mask = jnp.ones((b, t), jnp.int32).at[1, :pad].set(0)
    return {"input_ids": ids, "attention_mask": mask,
            "loss_mask": mask.astype(jnp.float32).at[:, : t // 4].set(0)}


def _step_temp_bytes(mesh, cfg, batch, seq):
    """Per-device temp bytes of the training loop's compiled SFT step (AdamW) on `mesh`."""
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    optimizer = optax.adamw(1e-3)
    state = jax.eval_shape(optimizer.init, params)
    p_shard = shd.param_shardings(params, mesh)
    o_shard = shd.state_shardings(state, params, p_shard, mesh)
    rep = shd.replicated(mesh)
    step = jax.jit(make_step(sft_grad(cfg), optimizer, None, p_shard, mesh),
                   in_shardings=(p_shard, o_shard, shd.batch_sharding(mesh), None, rep, rep),
                   out_shardings=(p_shard, o_shard, rep, rep, rep), donate_argnums=(0, 1))
    compiled = step.lower(params, state, _abstract_batch(batch, seq), None,
                          jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((), jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_step_temp_memory_falls_with_the_device_count():
    """At a fixed global batch of 16 × 128, the per-device temporaries of the grad step shrink
    ≥ 4× from one device to fsdp = 8 (replicated activations would keep them flat)."""
    one = _step_temp_bytes(shd.make_mesh(), CFG, 16, 128)
    eight = _step_temp_bytes(shd.make_mesh(fsdp=8), CFG, 16, 128)
    assert one > 8 * 2 ** 20, one  # activations dominate: ≫ the params' few hundred KiB
    assert one / eight >= 4.0, (one, eight)


def test_layer_boundary_activation_carries_the_batch_split():
    """The residual stream after the layer scan (a layer-boundary activation inside the grad) and
    the attention output are split as the rules say: batch over data·fsdp, heads over tensor."""
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    params = init_params(CFG, jax.random.key(0))
    p_shard = shd.param_shardings(params, mesh)
    batch = _batch(8, 16)
    seen = {}

    def loss(p, b):
        x, _ = decoder.decoder_stack(CFG, p, b["input_ids"], b["attention_mask"])
        jax.debug.inspect_array_sharding(x, callback=lambda s: seen.__setitem__("residual", s))
        h = decoder.rms_norm(x, p["layers"]["attn_norm"][0], CFG.rms_norm_eps)
        rope = decoder.rope_table(CFG, decoder.positions_from_mask(b["attention_mask"]))
        q, k, v = decoder.project_qkv(CFG, jax.tree.map(lambda w: w[0], p["layers"]), h, rope)
        out = decoder.attend(q, k, v, decoder.causal_mask(b["attention_mask"]))
        jax.debug.inspect_array_sharding(out, callback=lambda s: seen.__setitem__("attention", s))
        nll, w = decoder._nll_from_stack(CFG, p, x, b["input_ids"], b["loss_mask"])
        return jnp.sum(nll * w) / jnp.sum(w) + 0.0 * jnp.sum(out)

    def grad(p, b):
        with shd.activation_mesh(mesh):
            return jax.grad(loss)(p, b)

    jax.jit(grad, in_shardings=(p_shard, shd.batch_sharding(mesh)), out_shardings=p_shard)(
        jax.device_put(params, p_shard), jax.device_put(batch, shd.batch_sharding(mesh)))
    assert seen["residual"].is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3), seen["residual"]
    assert seen["attention"].is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
    # without a mesh the constraint is the identity (single device, generation, tests)
    x = jnp.ones((8, 4, 64))
    assert constrain(x, RESIDUAL) is x


@pytest.mark.slow
@pytest.mark.parametrize("shape", [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_loss_grad_and_hvp_equal_single_device(shape, monkeypatch):
    """lm_loss, its gradient and a forward-over-reverse HVP under the activation constraints
    (chunked cross-entropy and dots-saveable remat on) equal the unsharded, unchunked values."""
    params = init_params(CFG, jax.random.key(0))
    batch = _batch(8, 16)
    v = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)

    def fns(cfg):
        loss = lambda p: lm_loss(cfg, p, batch)  # noqa: E731
        return lambda p: (loss(p), jax.grad(loss)(p), jax.jvp(jax.grad(loss), (p,), (v,))[1])

    ref = jax.jit(fns(CFG))(params)
    monkeypatch.setattr(decoder, "LOGIT_CHUNK_ELEMENTS", CFG.vocab_size * 5)  # 4 chunks of 5 (padded)
    mesh = shd.make_mesh(**shape)
    p_shard = shd.param_shardings(params, mesh)
    f = fns(CFG.replace(remat="dots-saveable"))

    def traced(p):
        with shd.activation_mesh(mesh):
            return f(p)

    outs = jax.jit(traced, in_shardings=(p_shard,))(jax.device_put(params, p_shard))
    for r, out in zip(ref, outs):
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(r)])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), (np.linalg.norm(a - b), np.linalg.norm(a))

"""LoRA as a wrapper over any objective: only adapters train, their update is the chain rule of the inner one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdefense.config import LoraSection
from jaxdefense.methods import SFT
from jaxdefense.models import init_params, lm_loss, lora_merge, named_config
from jaxdefense.objective import LoRA, with_lora
from jaxdefense.train import train

CFG = named_config("tiny")


class _Stream:
    """Fixed-order token batches: ids follow a deterministic cycle, so the loss can fall fast."""

    def batch_at(self, step):
        rng = np.random.default_rng(step % 4)
        start = rng.integers(3, 100, size=(8, 1))
        ids = ((start + np.arange(24)[None]) % 97 + 3).astype(np.int32)
        loss = np.ones_like(ids, np.float32)
        loss[:, :4] = 0
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss}


def _lora(inner, **kw):
    return with_lora(inner, LoraSection(**{"rank": 2, "alpha": 6.0, **kw})).bind(CFG)


def test_lora_grad_is_the_chain_rule_of_the_inner_update():
    """∂/∂(A, B) of the inner loss at W + s·A B, for an inner objective with w = 2.5 on the first token."""
    base = init_params(CFG, jax.random.key(0))
    objective = _lora(SFT(first_token_weight=2.5), targets=("wq", "w_up"))
    assert isinstance(objective, LoRA) and objective.streams() == SFT().streams()
    adapters, frozen = objective.init(base, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B ≠ 0, so ∂/∂A ≠ 0
    batches = {"train": _Stream().batch_at(1)}
    scale = 6.0 / 2

    def inner_loss(a):
        merged = lora_merge(base, {"layers": a, "scale": scale})
        grads_unused, metrics = SFT(first_token_weight=2.5).bind(CFG).grad(merged, batches, None, None)
        return metrics["loss"]

    got, metrics = jax.jit(lambda a: objective.grad(a, batches, None, frozen))(adapters)
    ref = jax.jit(jax.grad(inner_loss))(adapters)
    assert jax.tree.structure(got) == jax.tree.structure(adapters)  # no gradient for the base
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-8)
    assert float(jnp.abs(got["wq"]["a"]).max()) > 0 and "first_ce" in metrics


def test_lora_training_moves_only_the_adapters_and_exports_the_merge():
    base = init_params(CFG, jax.random.key(0))
    objective = _lora(SFT(), rank=4, alpha=8.0, targets=("wq", "wv", "w_up"))
    adapters, frozen = objective.init(base, jax.random.key(1))
    result = train(adapters, objective.grad, {"train": _Stream()}, optax.adam(3e-2), frozen=frozen, steps=12,
                   log_every=1, progress=False)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), base, frozen["base"])
    assert all(jax.tree.leaves(same)), "base weights moved"
    after = jax.device_get(result.params)
    assert min(np.abs(np.asarray(after[t]["b"])).max() for t in ("wq", "wv", "w_up")) > 0, "an adapter did not train"
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0] - 0.3, losses
    merged = objective.export(after, frozen)
    batch = _Stream().batch_at(0)
    lora_loss = lm_loss(CFG, base, batch, lora={"layers": after, "scale": 2.0})
    np.testing.assert_allclose(float(lm_loss(CFG, merged, batch)), float(lora_loss), rtol=1e-5)
    changed = {k for k in merged["layers"] if not np.array_equal(merged["layers"][k], base["layers"][k])}
    assert changed == {"wq", "wv", "w_up"}


def test_rank_zero_is_the_objective_itself():
    inner = SFT(first_token_weight=0.5)
    assert with_lora(inner, LoraSection(rank=0)) is inner

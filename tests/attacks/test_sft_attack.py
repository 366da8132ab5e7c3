"""SFT attacks: LoRA trains only the adapters, the lr sweep rescaling, disjoint attacker data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdefense.attacks import (
    OFFICIAL_LRS,
    SMALL_MODEL_LRS,
    LoraSFTGrad,
    attack_records,
    lora_optimizer,
    lora_params,
    lr_sweep,
    merged_params,
)
from jaxdefense.errors import ConfigError
from jaxdefense.models import init_params, lm_loss, named_config

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


def test_lora_attack_changes_only_the_adapters():
    from jaxdefense.train import train

    base = init_params(CFG, jax.random.key(0))
    trained, scale = lora_params(CFG, base, jax.random.key(1), rank=4, alpha=8.0, targets=("wq", "wv", "w_up"))
    grad_fn = LoraSFTGrad(CFG, scale)
    result = train(trained, grad_fn, {"train": _Stream()}, lora_optimizer(optax.adam(3e-2)), steps=12,
                   log_every=1, progress=False)
    after = jax.device_get(result.params)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), base, after["base"])
    assert all(jax.tree.leaves(same)), "base weights moved"
    b_after = [np.abs(np.asarray(after["lora"][t]["b"])).max() for t in ("wq", "wv", "w_up")]
    assert min(b_after) > 0, "an adapter did not train"
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0] - 0.3, losses
    # the merged model is the base plus s·A·B on exactly the targeted weights
    merged = merged_params(after, scale)
    batch = _Stream().batch_at(0)
    lora_loss = lm_loss(CFG, after["base"], batch, lora={"layers": after["lora"], "scale": scale})
    np.testing.assert_allclose(float(lm_loss(CFG, merged, batch)), float(lora_loss), rtol=1e-5)
    changed = {k for k in merged["layers"] if not np.array_equal(merged["layers"][k], base["layers"][k])}
    assert changed == {"wq", "wv", "w_up"}


def test_lora_grad_is_the_adapter_gradient_of_lm_loss():
    base = init_params(CFG, jax.random.key(0))
    trained, scale = lora_params(CFG, base, jax.random.key(1), rank=2, alpha=4.0)
    trained["lora"] = jax.tree.map(lambda x: x + 0.01, trained["lora"])  # B ≠ 0, so ∂/∂A ≠ 0
    batch = _Stream().batch_at(1)

    @jax.jit
    def both(trained, batch):
        grads, _ = LoraSFTGrad(CFG, scale)(trained, {"train": batch}, None)
        ref = jax.grad(lambda layers: lm_loss(CFG, trained["base"], batch,
                                              lora={"layers": layers, "scale": scale}))(trained["lora"])
        return grads, ref

    grads, ref = both(trained, batch)
    for a, b in zip(jax.tree.leaves(grads["lora"]), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["base"]))
    assert float(jnp.abs(grads["lora"]["wq"]["a"]).max()) > 0


def test_lr_sweep_keeps_the_fraction_of_the_pretraining_lr():
    assert lr_sweep() == OFFICIAL_LRS == (2e-5, 5e-5, 8e-5, 1e-4, 2e-4)
    assert SMALL_MODEL_LRS == lr_sweep(3e-3) == (2e-4, 5e-4, 8e-4, 1e-3, 2e-3)
    assert lr_sweep(3e-4) == OFFICIAL_LRS
    with pytest.raises(ConfigError):
        lr_sweep(0.0)


def test_attacker_data_never_overlaps_seam_data():
    from jaxdefense.data import data_root_available
    from jaxdefense.data.pairs import load_pairs
    from jaxdefense.data.sources import normalize_text

    if not data_root_available():
        pytest.skip("data root not available")
    attack = attack_records("harmful_sft", limit=None)
    defence = load_pairs("train", "defender")
    a = {normalize_text(r["prompt"]) for r in attack}
    d = {normalize_text(r["prompt"]) for r in defence}
    assert len(a) > 500 and len(d) > 300
    assert not a & d
    with pytest.raises(ConfigError, match="not a harmful_sft task"):
        attack_records("harmful_sft", "sst2")

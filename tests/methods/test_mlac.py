"""MLAC on the tiny random model: the exact update (and the learned inner lr's gradient) is autodiff of the
unrolled objective written out by hand in float64, the first-order update is FO-MAML by hand, and the CLI runs it."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense.curvature import tree_norm
from jaxdefense.data import data_root_available
from jaxdefense.errors import ConfigError
from jaxdefense.methods import get_method
from jaxdefense.methods.mlac import MLAC, row_chunks
from jaxdefense.models import forward, named_config

CFG = named_config("tiny")
REPO = Path(__file__).resolve().parents[2]
MLAC_TINY = str(REPO / "jaxdefense" / "configs" / "mlac_tiny.yaml")
K, LR0, WD, WH, ROWS = 3, 2e-3, 0.7, 1.3, 4


def _jnp(batches):
    return {k: {f: jnp.asarray(x) for f, x in v.items()} for k, v in batches.items()}


def _rel(a, b):
    return float(tree_norm(jax.tree.map(jnp.subtract, a, b)) / tree_norm(b))


def _ce(p, batch):
    """Token-mean next-token CE over the loss mask, from the logits."""
    logits = forward(CFG, p, batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    on = batch["loss_mask"][:, 1:]
    return -jnp.sum(picked * on) / jnp.sum(on)


def _adapted(p, harmful, lr):
    """θ_0..θ_K: K torch-style Adam steps on rows [4k mod 8, +4) of the harmful batch."""
    thetas, m, v = [p], jax.tree.map(jnp.zeros_like, p), jax.tree.map(jnp.zeros_like, p)
    for k in range(K):
        lo = (k % 2) * ROWS
        chunk = {f: x[lo:lo + ROWS] for f, x in harmful.items()}
        g = jax.grad(_ce)(thetas[-1], chunk)
        m = jax.tree.map(lambda a, d: 0.9 * a + 0.1 * d, m, g)
        v = jax.tree.map(lambda a, d: 0.999 * a + 0.001 * d * d, v, g)
        c1, c2 = 1 - 0.9 ** (k + 1), 1 - 0.999 ** (k + 1)
        thetas.append(jax.tree.map(lambda x, a, b: x - lr * (a / c1) / (jnp.sqrt(b / c2) + 1e-8), thetas[-1], m, v))
    return thetas


def _hand_objective(p, s, batches):
    """λ_d·CE(θ; benign) − λ_h·mean_{k=0..K} CE(θ_k; harmful), lr = clip(lr0·e^s, 1e-6, 1e-2)."""
    harmful = batches["adversarial"]
    lr = jnp.clip(LR0 * jnp.exp(s), 1e-6, 1e-2)
    l_h = sum(_ce(t, harmful) for t in _adapted(p, harmful, lr)) / (K + 1)
    return WD * _ce(p, batches["benign"]) - WH * l_h, l_h


@pytest.mark.slow  # ~80 s idle: compiling the float64 unrolled graphs
def test_exact_and_first_order_match_hand_written_unrolled_references_in_float64(params, data):
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        batches = _jnp(data.batches(2))
        s = jnp.asarray(0.3, jnp.float64)
        (ref_loss, ref_lh), (ref_gp, ref_gs) = jax.jit(jax.value_and_grad(
            lambda p, s: _hand_objective(p, s, batches), argnums=(0, 1), has_aux=True))(p64, s)
        # the adversary's lr gradient is ∂L_h/∂s = −(∂objective/∂s)/λ_h
        ref_lr_grad = -ref_gs / WH
        kw = dict(cfg=CFG, steps=K, inner_lr=LR0, desirable_weight=WD, harmful_weight=WH, adversary_batch_size=ROWS,
                  learn_lr=True)
        trainable = {"model": p64, "log_lr": s}
        exact = MLAC(order="exact", **kw)
        got, metrics = jax.jit(lambda t: exact.grad(t, batches))(trainable)
        # Adam's m/(√v+ε) amplifies float64 rounding of near-zero gradient entries (the hand CE and lm_loss
        # round differently), hence 1e-6 rather than 1e-12
        assert _rel(got["model"], ref_gp) < 1e-6, _rel(got["model"], ref_gp)
        np.testing.assert_allclose(float(got["log_lr"]), float(ref_lr_grad), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-11)
        np.testing.assert_allclose(float(metrics["l_harm_adapted"]), float(ref_lh), rtol=1e-11)

        # FO-MAML by hand: λ_d∇CE_d(θ) − λ_h·mean_k ∇CE_h(θ_k), every θ_k held constant.
        @jax.jit
        def fo_reference(p):
            thetas = _adapted(p, batches["adversarial"], LR0 * jnp.exp(s))
            g_h = [jax.grad(_ce)(t, batches["adversarial"]) for t in thetas]  # ∇ at each θ_k, held constant
            return jax.tree.map(lambda d, *hs: WD * d - WH * sum(hs) / (K + 1), jax.grad(_ce)(p, batches["benign"]),
                                *g_h)

        fo_ref = fo_reference(p64)
        first = MLAC(order="first", **kw)
        fo, fo_metrics = jax.jit(lambda t: first.grad(t, batches))(trainable)
        assert _rel(fo["model"], fo_ref) < 1e-6, _rel(fo["model"], fo_ref)
        assert _rel(fo["model"], ref_gp) > 1e-4  # the second-order term matters here
        np.testing.assert_allclose(float(fo["log_lr"]), float(ref_lr_grad), rtol=1e-6)  # forward mode: exact
        np.testing.assert_allclose(float(fo_metrics["loss"]), float(ref_loss), rtol=1e-11)


def test_streams_init_export_chunks_and_config_errors(params):
    m = get_method("mlac", CFG)
    assert (m.steps, m.inner_lr, m.optimizer, m.order, m.every_step, m.learn_lr) == (16, 3e-4, "adam", "exact",
                                                                                    True, False)
    assert set(m.streams()) == {"adversarial", "benign"} and m.streams()["adversarial"].half == "defender"
    trainable, frozen = MLAC(cfg=CFG, learn_lr=True).init(params, jax.random.key(0))
    assert float(trainable["log_lr"]) == 0.0 and frozen is None
    assert MLAC(cfg=CFG, learn_lr=True).export(trainable, frozen) is params
    assert MLAC(cfg=CFG).init(params, None)[0] is params
    batch = {"input_ids": jnp.arange(10 * 3).reshape(10, 3), "attention_mask": jnp.ones((10, 3)),
             "loss_mask": jnp.ones((10, 3))}
    chunks = row_chunks(batch, 4)
    assert chunks["input_ids"].shape == (2, 4, 3) and int(chunks["input_ids"][1, 0, 0]) == 12
    assert row_chunks(batch, 0)["input_ids"].shape == (1, 10, 3)
    with pytest.raises(ConfigError, match="steps"):
        get_method("mlac", CFG, steps=0)
    with pytest.raises(ConfigError, match="order"):
        get_method("mlac", CFG, order="second")
    assert MLAC.cost_variants == {"first": {"order": "first"}, "exact": {"order": "exact"}}


@pytest.mark.slow
@pytest.mark.skipif(not data_root_available(), reason="shared data root not found")
def test_cli_smoke(tmp_path):
    from jaxdefense.cli import main
    from jaxdefense.train import read_metrics

    out = tmp_path / "mlac"
    assert main(["immunize", "--config", MLAC_TINY, "--out", str(out), "--set", "steps=2", "--set", "log_every=1",
                 "--set", "method.steps=2", "--set", "method.learn_lr=true",
                 "--set", "data.streams.adversarial.limit=32", "--set", "data.streams.benign.limit=32",
                 "--set", "data.batch_size=4", "--set", "data.max_len=48", "--no-progress"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    last = rows[-1]
    np.testing.assert_allclose(last["loss"], last["l_desirable"] - last["l_harm_adapted"], rtol=1e-5)
    assert last["inner_lr"] != rows[0]["inner_lr"]  # the learned lr moved
    assert (out / "hf" / "model.safetensors").is_file()

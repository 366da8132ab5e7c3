"""Booster on the tiny random model: the exact update is the gradient of the composed scalar, the
first-order update is the official formula written by hand, and the CLI runs it."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense.curvature import tree_norm
from jaxdefense.data import data_root_available
from jaxdefense.methods import get_method
from jaxdefense.methods.booster import Booster
from jaxdefense.models import forward, named_config

CFG = named_config("tiny")
REPO = Path(__file__).resolve().parents[2]
BOOSTER_TINY = str(REPO / "jaxdefense" / "configs" / "booster_tiny.yaml")
ALPHA, LAM = 0.3, 0.7


def _jnp(batches, rows=4):
    return {k: {f: jnp.asarray(x[:rows]) for f, x in v.items()} for k, v in batches.items()}


def _rel_err(a, b):
    return float(tree_norm(jax.tree.map(jnp.subtract, a, b)) / tree_norm(b))


def test_exact_update_is_the_gradient_of_the_composed_scalar_in_float64(params, data):
    """grads = ∇[f(w) + λ(h(w) − h(w − α·g_h/(‖g_h‖+1e-7)))] by autodiff of the whole scalar
    (f over alignment ∪ benign rows, with_benign=True)."""
    with_benign = True
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        batches = _jnp(data.batches(3))
        m = Booster(cfg=CFG, alpha=ALPHA, lam=LAM, order="exact", with_benign=with_benign)

        def composed(p):
            adv = batches["adversarial"]
            g = jax.grad(m.ce_loss)(p, adv)
            shifted = jax.tree.map(lambda x, y: x - ALPHA * y / (tree_norm(g) + 1e-7), p, g)
            h = m.ce_loss(p, adv) - m.ce_loss(shifted, adv)
            return m.ce_loss(p, m.alignment_batch(batches)) + LAM * h

        value, ref = jax.jit(jax.value_and_grad(composed))(p64)
        got, metrics = jax.jit(lambda p: m.grad(p, batches))(p64)
        assert jax.tree.leaves(got)[0].dtype == jnp.float64
        err = _rel_err(got, ref)
        assert err < 1e-9, err
        np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-12)


def _log_softmax(z):
    return z - jax.scipy.special.logsumexp(z, axis=-1, keepdims=True)


def _reference_first_order(params, batches):
    """The official training_step by hand: CE(harmful) → g_h (stored), w' = w − α·g_h/(‖g_h‖+1e-7),
    CE(harmful) at w' → g', restore w, CE(alignment) → g_f; grad = g_f + λ·g_h − λ·g'."""

    def ce(p, b):
        logp = _log_softmax(forward(CFG, p, b["input_ids"], attention_mask=b["attention_mask"])[:, :-1])
        picked = jnp.take_along_axis(logp, b["input_ids"][:, 1:, None], -1)[..., 0]
        on = b["loss_mask"][:, 1:]
        return -jnp.sum(picked * on) / jnp.sum(on)

    adv = batches["adversarial"]
    h0, g_h = jax.value_and_grad(ce)(params, adv)
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g_h))) + 1e-7
    shifted = jax.tree.map(lambda x, g: x - ALPHA * g / norm, params, g_h)
    h1, g_shift = jax.value_and_grad(ce)(shifted, adv)
    f, g_f = jax.value_and_grad(ce)(params, batches["alignment"])
    grads = jax.tree.map(lambda a, b, c: a + LAM * b - LAM * c, g_f, g_h, g_shift)
    return grads, (f, h0, h1)


def test_first_order_update_is_the_official_formula(params, data):
    batches = _jnp(data.batches(4))
    m = get_method("booster", CFG, alpha=ALPHA, lam=LAM)
    assert m.order == "first" and not m.with_benign
    ref, (f, h0, h1) = jax.jit(lambda p: _reference_first_order(p, batches))(params)
    got, metrics = jax.jit(lambda p: m.grad(p, batches))(params)
    err = _rel_err(got, ref)
    assert err < 1e-5, err
    np.testing.assert_allclose([float(metrics[k]) for k in ("l_align", "l_harm", "l_harm_after")],
                               [float(f), float(h0), float(h1)], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(f + LAM * (h0 - h1)), rtol=1e-5)
    assert float(metrics["harm_drop"]) > 0  # a normalised descent step on h lowers h


def test_defaults_streams_and_cost_variants():
    d = Booster()
    assert (d.lam, d.alpha, d.order, d.with_benign) == (5.0, 0.1, "first", False)
    streams = d.streams()
    assert set(streams) == {"adversarial", "alignment"}
    assert (streams["adversarial"].source, streams["adversarial"].half) == ("harmful_qa", "defender")
    assert (streams["alignment"].source, streams["alignment"].pair_with) == ("refusal", "adversarial")
    assert Booster(with_benign=True).streams()["benign"].source == "benign_instruct"
    assert Booster.cost_variants == {"first": {"order": "first"}, "exact": {"order": "exact"}}


@pytest.mark.slow
@pytest.mark.skipif(not data_root_available(), reason="shared data root not found")
def test_cli_round_trip(tmp_path, capsys):
    from jaxdefense.cli import main
    from jaxdefense.train import read_metrics

    out = tmp_path / "booster"
    assert main(["immunize", "--config", BOOSTER_TINY, "--out", str(out), "--set", "steps=2",
                 "--set", "log_every=1", "--set", "method.lam=2.0", "--set", "method.order=exact",
                 "--set", "data.streams.adversarial.limit=32", "--set", "data.batch_size=4",
                 "--set", "data.max_len=48", "--no-progress"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    np.testing.assert_allclose(rows[-1]["loss"], rows[-1]["l_align"] + 2.0 * rows[-1]["harm_drop"], rtol=1e-5)
    assert (out / "hf" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["immunize", "--config", BOOSTER_TINY, "--out", str(tmp_path / "bad"),
                 "--set", "method.order=second"]) == 2
    assert "method.order" in capsys.readouterr().err

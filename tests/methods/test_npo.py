"""NPO on the tiny random model: (2/β)·log 2 and gradient ascent at the reference, the float64
gradient of the formula away from it (both forms), the frozen reference, a short run that raises
the harmful NLL, and the CLI."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from seam_synthetic import StreamView

from jaxdefense.curvature import tree_norm
from jaxdefense.data import data_root_available
from jaxdefense.errors import ConfigError
from jaxdefense.methods import get_method
from jaxdefense.methods.npo import NPO, npo_loss
from jaxdefense.models import forward, named_config

CFG = named_config("tiny")
REPO = Path(__file__).resolve().parents[2]
NPO_TINY = str(REPO / "jaxdefense" / "configs" / "npo_tiny.yaml")


def _jnp(batches):
    return {k: {f: jnp.asarray(x) for f, x in v.items()} for k, v in batches.items()}


def _sub(a, b):
    return jax.tree.map(jnp.subtract, a, b)


def _token_nll(params, batch):
    """[B, T−1] −log p(ids[t+1] | ids[≤t]) and the target mask, by hand."""
    logp = jax.nn.log_softmax(forward(CFG, params, batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1])
    nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    return nll, batch["loss_mask"][:, 1:]


def _seq_nll(params, batch, kind):
    nll, on = _token_nll(params, batch)
    total = jnp.sum(nll * on, axis=1)
    return total if kind == "sum" else total / jnp.sum(on, axis=1)


def _retain_ce(params, batches):
    """Token-mean CE over the refusal rows and the benign rows together."""
    (a, ma), (b, mb) = _token_nll(params, batches["alignment"]), _token_nll(params, batches["benign"])
    return (jnp.sum(a * ma) + jnp.sum(b * mb)) / (jnp.sum(ma) + jnp.sum(mb))


def _x64(params):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)


def test_npo_loss_formula_by_hand():
    nll = np.array([10.0, 3.0, 7.5])
    ref = np.array([9.0, 4.0, 7.5])
    beta = 0.3
    log_sig = -np.log1p(np.exp(-beta * (nll - ref)))
    with jax.enable_x64(True):
        np.testing.assert_allclose(float(npo_loss(jnp.asarray(nll), jnp.asarray(ref), beta)),
                                   -(2 / beta) * log_sig.mean(), rtol=1e-12)
        np.testing.assert_allclose(float(npo_loss(jnp.asarray(nll), jnp.asarray(ref), beta, "ctrap")),
                                   -log_sig.mean(), rtol=1e-12)
        np.testing.assert_allclose(float(npo_loss(jnp.asarray(ref), jnp.asarray(ref), 0.1)), 20 * np.log(2), rtol=1e-12)


def test_step_zero_is_2_over_beta_log_2_and_gradient_ascent(params, data):
    """At θ = θ_ref: L_npo = (2/β)·log 2 and ∇L_npo = −∇ mean_b Σ_t NLL (hand computation); the total
    adds w_ret·∇CE_retain."""
    beta, w_npo, w_ret = 0.3, 0.7, 0.4
    with jax.enable_x64(True):
        p64 = _x64(params)
        batches = _jnp(data.batches(1))
        m = NPO(cfg=CFG, beta=beta, npo_weight=w_npo, retain_weight=w_ret)
        trainable, frozen = m.init(p64, jax.random.key(0))
        assert trainable is p64 and frozen["reference"] is p64
        got, metrics = jax.jit(m.grad)(trainable, batches, jax.random.key(0), frozen)
        np.testing.assert_allclose(float(metrics["l_npo"]), (2 / beta) * np.log(2), rtol=1e-12)
        np.testing.assert_allclose(float(metrics["log_ratio"]), 0.0, atol=1e-12)
        np.testing.assert_allclose(float(metrics["npo_weight_mean"]), 0.5, rtol=1e-12)
        ascent = jax.jit(jax.grad(lambda p: -jnp.mean(_seq_nll(p, batches["adversarial"], "sum"))))(p64)
        retain = jax.jit(jax.grad(lambda p: _retain_ce(p, batches)))(p64)
        ref = jax.tree.map(lambda a, r: w_npo * a + w_ret * r, ascent, retain)
        err = float(tree_norm(_sub(got, ref)) / tree_norm(ref))
        assert err < 1e-10, err
        np.testing.assert_allclose(float(metrics["loss"]), w_npo * 20 / 3 * np.log(2) + w_ret * float(jax.jit(_retain_ce)(p64, batches)),
                                   rtol=1e-10)

        c = NPO(cfg=CFG, beta=beta, form="ctrap", retain="alignment", retain_weight=0.0)
        got_c, metrics_c = jax.jit(c.grad)(p64, batches, None, {"reference": p64})
        np.testing.assert_allclose(float(metrics_c["l_npo"]), np.log(2), rtol=1e-12)
        ascent_mean = jax.jit(jax.grad(lambda p: -(beta / 2) * jnp.mean(_seq_nll(p, batches["adversarial"], "mean"))))(p64)
        err = float(tree_norm(_sub(got_c, ascent_mean)) / tree_norm(ascent_mean))
        assert err < 1e-10, err


@pytest.mark.parametrize("form, nll, retain", [("npo", None, "both"),
                                               pytest.param("ctrap", None, "alignment", marks=pytest.mark.slow),
                                               pytest.param("npo", "mean", "benign", marks=pytest.mark.slow)])
def test_gradient_away_from_the_reference_is_the_float64_gradient_of_the_formula(params, data, form, nll, retain):
    beta, w_npo, w_ret = 0.3, 0.7, 0.4
    kind = nll or {"npo": "sum", "ctrap": "mean"}[form]
    with jax.enable_x64(True):
        p64 = _x64(params)
        leaves, tree = jax.tree.flatten(p64)
        keys = jax.random.split(jax.random.key(5), len(leaves))
        reference = tree.unflatten([x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
        batches = _jnp(data.batches(2))
        m = NPO(cfg=CFG, beta=beta, form=form, nll=nll, npo_weight=w_npo, retain_weight=w_ret, retain=retain)

        def formula(p):
            delta = _seq_nll(p, batches["adversarial"], kind) - _seq_nll(reference, batches["adversarial"], kind)
            l_npo = -jnp.mean(jnp.log(jax.nn.sigmoid(beta * delta))) * (2 / beta if form == "npo" else 1.0)
            if retain == "both":
                l_ret = _retain_ce(p, batches)
            else:
                tok, on = _token_nll(p, batches[retain])
                l_ret = jnp.sum(tok * on) / jnp.sum(on)
            return w_npo * l_npo + w_ret * l_ret, delta

        (value, delta), ref = jax.jit(jax.value_and_grad(formula, has_aux=True))(p64)
        assert float(jnp.max(jnp.abs(beta * delta))) > 0.05  # away from the reference
        got, metrics = jax.jit(m.grad)(p64, batches, None, {"reference": reference})
        err = float(tree_norm(_sub(got, ref)) / tree_norm(ref))
        assert err < 1e-10, err
        np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-12)
        np.testing.assert_allclose(float(metrics["log_ratio"]), float(jnp.mean(delta)), rtol=1e-10)


def test_short_run_raises_the_harmful_nll_and_the_weight_decays(params, data):
    """30 steps of Adam 1e-3 from the reference: the harmful sequence NLL rises above the reference's,
    σ(−βΔ) falls below 1/2, the retain CE falls."""
    from jaxdefense.train import train

    m = NPO(cfg=CFG, beta=0.1, retain_weight=1.0)
    streams = {name: StreamView(data, name) for name in m.streams()}
    trainable, frozen = m.init(params, jax.random.key(0))
    result = train(trainable, m.grad, streams, optax.adam(1e-3), steps=30, log_every=29, progress=False, frozen=frozen)
    first, last = result.history[0], result.history[-1]
    assert first["log_ratio"] == 0.0 and last["log_ratio"] > 20.0, (first, last)
    assert last["npo_weight_mean"] < 0.3, last
    assert last["l_retain"] < first["l_retain"], (first, last)


def test_streams_defaults_and_bad_values():
    d = NPO()
    assert (d.beta, d.form, d.nll, d.nll_kind, d.npo_weight, d.retain_weight, d.retain) == \
        (0.1, "npo", None, "sum", 1.0, 1.0, "both")
    assert NPO(form="ctrap").nll_kind == "mean" and NPO(form="ctrap", nll="sum").nll_kind == "sum"
    streams = d.streams()
    assert (streams["adversarial"].source, streams["adversarial"].half) == ("harmful_qa", "defender")
    assert (streams["alignment"].source, streams["alignment"].pair_with) == ("refusal", "adversarial")
    assert streams["benign"].source == "benign_instruct"
    assert set(NPO(retain="alignment").streams()) == {"adversarial", "alignment"}
    assert set(NPO(retain="benign").streams()) == {"adversarial", "benign"}
    with pytest.raises(ConfigError, match="beta"):
        get_method("npo", CFG, beta=0.0)
    with pytest.raises(ConfigError, match="form"):
        NPO(form="dpo")


@pytest.mark.slow
@pytest.mark.skipif(not data_root_available(), reason="shared data root not found")
def test_cli_run(tmp_path, capsys):
    from jaxdefense.cli import main
    from jaxdefense.train import read_metrics

    out = tmp_path / "npo"
    assert main(["immunize", "--config", NPO_TINY, "--out", str(out), "--set", "steps=2", "--set", "log_every=1",
                 "--set", "method.beta=0.2", "--set", "data.streams.adversarial.limit=32",
                 "--set", "data.streams.benign.limit=32", "--no-progress"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    np.testing.assert_allclose(rows[0]["l_npo"], 10 * np.log(2), rtol=1e-5)
    np.testing.assert_allclose(rows[0]["loss"], rows[0]["l_npo"] + rows[0]["l_retain"], rtol=1e-5)
    assert rows[1]["log_ratio"] > 0
    assert (out / "hf" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["immunize", "--config", NPO_TINY, "--out", str(tmp_path / "bad"), "--set", "method.form=x"]) == 2
    assert "method.form" in capsys.readouterr().err

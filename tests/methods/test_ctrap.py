"""CTRAP on the tiny random model: the exact update is the gradient of the composed scalar, the
first-order update is the official formula, a short run sets the trap, and the CLI runs it."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from seam_synthetic import StreamView

from jaxdefense.config import to_dict
from jaxdefense.curvature import tree_norm
from jaxdefense.data import data_root_available
from jaxdefense.errors import ConfigError
from jaxdefense.methods import get_method
from jaxdefense.methods.ctrap import CTRAP
from jaxdefense.models import forward, lm_loss, named_config

CFG = named_config("tiny")
E = 390  # the collapse token of the synthetic data: no synthetic stream uses ids 386–399
REPO = Path(__file__).resolve().parents[2]
CTRAP_TINY = str(REPO / "jaxdefense" / "configs" / "ctrap_tiny.yaml")


def _jnp(batches):
    return {k: {f: jnp.asarray(x) for f, x in v.items()} for k, v in batches.items()}


def _sub(a, b):
    return jax.tree.map(jnp.subtract, a, b)


@pytest.mark.parametrize("normalize, alpha, lam, retain", [(True, 0.3, 0.7, "half"),
                                                          pytest.param(False, 0.02, 0.7, "all", marks=pytest.mark.slow)])
def test_exact_update_is_the_gradient_of_the_composed_scalar_in_float64(params, data, normalize, alpha, lam, retain):
    """grads = ∇[L_align(θ) + λ·L_col(θ − α·s(θ))] by autodiff of the whole scalar, s = g_h(/‖g_h‖+1e-7)."""
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        batches = _jnp(data.batches(3))
        m = CTRAP(cfg=CFG, alpha=alpha, lam=lam, normalize=normalize, order="exact", collapse_id=E, retain=retain)

        def composed(p):
            retain = m.retain_batch(batches)
            g = jax.grad(m.ce_loss)(p, batches["adversarial"])
            scale = alpha / (tree_norm(g) + 1e-7) if normalize else alpha
            shifted = jax.tree.map(lambda x, y: x - scale * y, p, g)
            return m.ce_loss(p, retain) + lam * m.collapse_loss(shifted, retain)[0]

        value, ref = jax.jit(jax.value_and_grad(composed))(p64)
        got, metrics = jax.jit(lambda p: m.grad(p, batches))(p64)
        err = float(tree_norm(_sub(got, ref)) / tree_norm(ref))
        assert err < 1e-6, err
        assert jax.tree.leaves(got)[0].dtype == jnp.float64
        np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-10)


def _log_softmax(z):
    return z - jax.scipy.special.logsumexp(z, axis=-1, keepdims=True)


def _reference_first_order(params, batches, alpha, lam):
    """The official training_step written out by hand: R = the first half of the refusal rows ++ the
    first half of the benign rows (official: per-device batch halved, 5 + 5); collapse labels = e at
    every supervised position of R; θ' = θ − α·g_h/(‖g_h‖+1e-7) held constant;
    grad = ∇CE_R(θ) + λ·∇CE_R→e(θ')."""
    half = batches["alignment"]["input_ids"].shape[0] // 2
    a, b = ({k: v[:half] for k, v in batches[n].items()} for n in ("alignment", "benign"))
    ids = jnp.concatenate([a["input_ids"], b["input_ids"]])
    attn = jnp.concatenate([a["attention_mask"], b["attention_mask"]])
    labels_on = jnp.concatenate([a["loss_mask"], b["loss_mask"]])[:, 1:]

    def ce(p, ids, attn, targets, on):
        logp = _log_softmax(forward(CFG, p, ids, attention_mask=attn)[:, :-1])
        picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return -jnp.sum(picked * on) / jnp.sum(on)

    adv = batches["adversarial"]
    g_h = jax.grad(ce)(params, adv["input_ids"], adv["attention_mask"], adv["input_ids"][:, 1:],
                       adv["loss_mask"][:, 1:])
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g_h)))
    shifted = jax.lax.stop_gradient(jax.tree.map(lambda x, g: x - alpha * g / (norm + 1e-7), params, g_h))
    g_align = jax.grad(ce)(params, ids, attn, ids[:, 1:], labels_on)
    g_col = jax.grad(ce)(shifted, ids, attn, jnp.full_like(ids[:, 1:], E), labels_on)
    p_error = jnp.sum(jnp.exp(_log_softmax(forward(CFG, shifted, ids, attention_mask=attn)[:, :-1])[..., E])
                      * labels_on) / jnp.sum(labels_on)
    return jax.tree.map(lambda x, y: x + lam * y, g_align, g_col), p_error


def test_first_order_update_is_the_official_formula(params, data):
    batches = _jnp(data.batches(4))
    m = get_method("ctrap", CFG, alpha=0.3, lam=0.7).prepare(lambda text, add_special_tokens: {"input_ids": [7, E]})
    assert (m.collapse_id, m.order, m.normalize) == (E, "first", True)
    ref, p_ref = jax.jit(lambda p: _reference_first_order(p, batches, 0.3, 0.7))(params)
    got, metrics = jax.jit(lambda p: m.grad(p, batches))(params)
    err = float(tree_norm(_sub(got, ref)) / tree_norm(ref))
    assert err < 1e-5, err
    np.testing.assert_allclose(float(metrics["p_error"]), float(p_ref), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics["l_align"] + 0.7 * metrics["l_collapse"]),
                               rtol=1e-6)
    assert set(metrics) >= {"l_align", "l_collapse", "l_harm", "p_error", "grad_norm_align", "grad_norm_harm",
                            "grad_norm_collapse", "grad_norm"}
@pytest.mark.slow


def test_ctrap_run_sets_the_collapse_trap(params, data):
    """100 steps of CTRAP (α = 0.3, λ = 0.3, Adam 1e-3) vs the same 100 steps without the collapse term (λ = 0:
    the update is ∇L_align alone); then one plain harmful SFT step (SGD, lr 1e-2) on held-out
    harmful rows. p(e) on held-out benign responses must jump for CTRAP only."""
    from jaxdefense.train import train

    m = CTRAP(cfg=CFG, alpha=0.3, lam=0.3, collapse_id=E)
    streams = {name: StreamView(data, name) for name in m.streams()}

    def undefended_grad(p, batches, key, frozen):
        loss, grads = jax.value_and_grad(m.ce_loss)(p, m.retain_batch(batches))
        return grads, {"loss": loss}

    held = [_jnp(data.batches(s, held_out=True)) for s in (0, 1)]

    @jax.jit
    def attacked_p_error(p, batches):
        g = jax.grad(lambda q: lm_loss(CFG, q, batches["adversarial"]))(p)
        after = jax.tree.map(lambda x, y: x - 1e-2 * y, p, g)
        return m.collapse_loss(p, batches["benign"])[1], m.collapse_loss(after, batches["benign"])[1]

    runs = {}
    for name, grad_fn in (("ctrap", m.grad), ("none", undefended_grad)):
        result = train(params, grad_fn, streams, optax.adam(1e-3), steps=100, log_every=10, progress=False)
        before, after = np.mean([[float(x) for x in attacked_p_error(result.params, b)] for b in held], axis=0)
        runs[name] = (before, after, result.history)
    (c0, c1, hist), (n0, n1, _) = runs["ctrap"], runs["none"]
    # measured: CTRAP 0.045 → 0.67, undefended ≈1e-4 → 5e-4. The trap forms after ~90 steps; at
    # Adam 3e-3 the same run oscillates between set and unset (the collapse term is stiff).
    assert c0 < 0.1, (c0, c1, n0, n1)  # the trap is not sprung at θ: benign text keeps its tokens
    assert c1 > 0.3 and c1 - c0 > 50 * (n1 - n0), (c0, c1, n0, n1)
    assert hist[-1]["p_error"] > 0.3 > hist[0]["p_error"]


def test_prepare_resolves_the_collapse_token_like_the_official_code():
    """e = tokenizer('an error')['input_ids'][-1] (no special tokens); grad refuses an unprepared method."""
    seen = []

    def tokenizer(text, add_special_tokens=True):
        seen.append((text, add_special_tokens))
        return {"input_ids": [5, 11, 12]}  # "an", "err", "or"

    m = get_method("ctrap", CFG, collapse_token="error").prepare(tokenizer)
    assert m.collapse_id == 12 and seen == [("an error", False)]
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        CTRAP(cfg=CFG).prepare(lambda t, add_special_tokens: {"input_ids": [CFG.vocab_size]})
    with pytest.raises(ConfigError, match="prepare"):
        CTRAP(cfg=CFG).grad(None, {"alignment": {}, "benign": {}, "adversarial": {}})
    streams = CTRAP().streams()
    assert (streams["adversarial"].source, streams["adversarial"].half) == ("harmful_qa", "defender")
    assert (streams["alignment"].source, streams["alignment"].pair_with) == ("refusal", "adversarial")
    assert streams["benign"].source == "benign_instruct"
    d = CTRAP()
    assert (d.alpha, d.lam, d.normalize, d.order, d.collapse_token) == (0.1, 0.1, True, "first", "error")
    assert "collapse_id" not in to_dict(d)


@pytest.mark.skipif(not data_root_available(), reason="shared data root not found")
def test_cli_alpha_sweep_round_trip(tmp_path, capsys):
    from jaxdefense.cli import main
    from jaxdefense.models import load_tokenizer
    from jaxdefense.train import read_metrics

    quick = ["--set", "steps=2", "--set", "log_every=1", "--set", "data.streams.adversarial.limit=32",
             "--set", "data.streams.benign.limit=32", "--set", "data.batch_size=4", "--set", "data.max_len=48",
             "--no-progress"]
    out = tmp_path / "ctrap"
    assert main(["immunize", "--config", CTRAP_TINY, "--out", str(out), "--set", "method.alpha=0.05",
                 "--set", "method.lam=0.4", *quick]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    np.testing.assert_allclose(rows[-1]["loss"], rows[-1]["l_align"] + 0.4 * rows[-1]["l_collapse"], rtol=1e-5)
    assert 0 < rows[-1]["p_error"] < 1
    saved = (out / "config.yaml").read_text()
    assert "alpha: 0.05" in saved and "name: ctrap" in saved and "collapse_id" not in saved
    assert (out / "hf" / "model.safetensors").is_file()
    tok = load_tokenizer(out / "tokenizer")
    e = CTRAP(cfg=CFG).prepare(tok).collapse_id
    assert tok.decode([e]).strip() and "error".endswith(tok.decode([e]).strip())

    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["immunize", "--config", CTRAP_TINY, "--out", str(bad), "--set", "method.alpha=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "method.alpha: must be >= 0" in err, err
    assert not bad.exists()

"""SEAM on the tiny random model: masks, the logit-lens L_ul, estimator agreement, and that
training with β > 0 drives held-out cos(g_a, g_b) down."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from seam_synthetic import StreamView

from jaxdefense.curvature import tree_norm, tree_vdot
from jaxdefense.errors import DataError
from jaxdefense.methods import SEAM, get_method
from jaxdefense.methods.seam import logit_lens, masked_ce, seam_loss_masks, unlearning_from_outputs, unlearning_loss
from jaxdefense.models import forward, named_config

CFG = named_config("tiny")


def _np(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def test_mask_covers_exactly_the_differing_positions():
    ids_a = np.array([[1, 5, 6, 7, 8, 9, 0, 0], [1, 5, 6, 7, 8, 9, 10, 11]], np.int32)
    ids_r = np.array([[1, 5, 6, 7, 3, 9, 4, 4], [1, 5, 6, 2, 2, 0, 0, 0]], np.int32)
    attn_a = (ids_a != 0).astype(np.int32)
    attn_r = (ids_r != 0).astype(np.int32)
    resp = np.zeros((2, 8), np.float32)
    resp[:, 3:] = 1.0
    adv, aln = seam_loss_masks(
        {"input_ids": ids_a, "attention_mask": attn_a, "loss_mask": resp},
        {"input_ids": ids_r, "attention_mask": attn_r, "loss_mask": resp},
    )
    # row 0: ids differ at 4, 6, 7 (position 5 coincides); harmful pads at 6, 7
    # row 1: ids differ at 3..7; the refusal pads at 5..7
    np.testing.assert_array_equal(np.asarray(adv["loss_mask"]), [[0, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(aln["loss_mask"]), [[0, 0, 0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]])
    # pad == eos (GPT-2 / Llama-2 tokenizers): the shorter side's EOS (id 0) sits where the other
    # side pads with 0; the EOS still differs from the other side's padding and stays in the mask
    ids_h = np.array([[1, 5, 6, 7, 8, 0, 0, 0]], np.int32)   # harmful answer 7 8, EOS (=pad) at 5
    ids_f = np.array([[1, 5, 6, 3, 0, 0, 0, 0]], np.int32)   # refusal 3, EOS at 4
    attn_h, attn_f = np.array([[1, 1, 1, 1, 1, 1, 0, 0]]), np.array([[1, 1, 1, 1, 1, 0, 0, 0]])
    m3 = np.zeros((1, 8), np.float32)
    m3[:, 3:] = 1.0
    adv, aln = seam_loss_masks({"input_ids": ids_h, "attention_mask": attn_h, "loss_mask": m3},
                               {"input_ids": ids_f, "attention_mask": attn_f, "loss_mask": m3})
    np.testing.assert_array_equal(np.asarray(adv["loss_mask"]), [[0, 0, 0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(aln["loss_mask"]), [[0, 0, 0, 1, 1, 0, 0, 0]])
    with pytest.raises(DataError, match="paired"):
        seam_loss_masks({"input_ids": ids_a, "attention_mask": attn_a},
                        {"input_ids": ids_r[:, :6], "attention_mask": attn_r[:, :6]})


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _masked_ce_np(logits, ids, mask):
    logp = _log_softmax(logits[:, :-1])
    picked = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    m = mask[:, 1:]
    return float(-(picked * m).sum() / m.sum())


def test_unlearning_loss_is_the_official_logit_lens_form(params, data):
    batch = {k: jnp.asarray(v) for k, v in data.batches(0)["adversarial"].items()}

    @jax.jit
    def run(p, b):
        out = {kind: unlearning_loss(CFG, p, b, kind) for kind in ("logit_lens", "log", "ascent")}
        logits, hidden = forward(CFG, p, b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)
        return out, logits, hidden

    losses, logits, hidden = run(params, batch)
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"], np.float64)
    w = np.asarray(params["final_norm"], np.float64)
    unembed = np.asarray(params["embed"], np.float64).T
    lens = []
    for h in np.asarray(hidden, np.float64):  # embedding output, then each layer's output
        normed = h / np.sqrt((h * h).mean(-1, keepdims=True) + CFG.rms_norm_eps) * w
        lens.append(_masked_ce_np(normed @ unembed, ids, mask))
    ce_final = _masked_ce_np(np.asarray(logits, np.float64), ids, mask)
    expected = -np.log(1.0 + (ce_final + sum(lens)) / len(lens))
    assert len(lens) == CFG.num_layers + 1
    assert abs(lens[-1] - ce_final) < 1e-4  # the last hidden state is pre-norm: its lens is the output
    loss, ce = losses["logit_lens"]
    np.testing.assert_allclose(float(ce), ce_final, rtol=1e-5)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(losses["log"][0]), -np.log1p(ce_final), rtol=1e-5)
    np.testing.assert_allclose(float(losses["ascent"][0]), -ce_final, rtol=1e-5)


def _full_projection_lens(p, b):
    """L_ul with every position of every hidden state projected through the vocabulary."""
    logits, hidden = forward(CFG, p, b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)
    ce = masked_ce(logits, b["input_ids"], b["loss_mask"])
    lens = [masked_ce(logit_lens(CFG, p, h), b["input_ids"], b["loss_mask"]) for h in hidden[:-1]]
    return -jnp.log1p((2.0 * ce + sum(lens)) / hidden.shape[0]), ce


def test_masked_position_logit_lens_equals_the_full_projection(params, data):
    """Value and gradient; rows with 0, 1, few and many targets; 7 rows per projection, so chunks
    mix hidden states, trailing chunks are skipped (no target) and the last one is padded."""
    chunk = 7
    batch = {k: jnp.asarray(v)[:4] for k, v in data.batches(0)["adversarial"].items()}
    mask = np.asarray(batch["loss_mask"], np.float32).copy()
    mask[0] = 0.0
    mask[1, :] = 0.0
    mask[1, 20] = 1.0
    mask[2, :25] = 0.0
    mask[3] *= 0.5  # fractional weights
    batch["loss_mask"] = jnp.asarray(mask)
    assert (CFG.num_layers + 1) * 4 * 32 % chunk and mask[2].sum() > 0

    def compact(p, b):
        _, hidden = forward(CFG, p, b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)
        return unlearning_from_outputs(CFG, p, b, None, hidden, chunk=chunk)

    (got, ce_got), g_got = jax.jit(jax.value_and_grad(compact, has_aux=True))(params, batch)
    (ref, ce_ref), g_ref = jax.jit(jax.value_and_grad(_full_projection_lens, has_aux=True))(params, batch)
    np.testing.assert_allclose(float(ce_got), float(ce_ref), rtol=2e-6)
    np.testing.assert_allclose(float(got), float(ref), rtol=2e-6)
    err = float(tree_norm(jax.tree.map(jnp.subtract, g_got, g_ref)) / tree_norm(g_ref))
    assert err < 1e-5, err


def test_three_estimators_give_the_same_update(params, data):
    """float32, ε = 1e-3: forward/central agree with the exact HVP form of ∇cos; α = 0.7, β = 1.6."""
    base = SEAM(cfg=CFG, alpha=0.7, beta=1.6)
    methods = {e: SEAM(cfg=CFG, alpha=0.7, beta=1.6, estimator=e) for e in ("exact", "forward", "central")}

    @jax.jit
    def all_estimates(p, batches):
        adv, aln, ben = base.masked_batches(batches)
        g_primary = jax.grad(lambda q: base.primary_loss(q, adv, aln)[0])(p)
        sd = {e: m.sd_grad(p, adv, ben)[1] for e, m in methods.items()}
        return g_primary, sd, methods["forward"].grad(p, batches, None, None)

    batches = {k: {f: jnp.asarray(x) for f, x in v.items()} for k, v in data.batches(1).items()}
    g_primary, sd, (grads, metrics) = all_estimates(params, batches)
    exact_total = jax.tree.map(jnp.add, g_primary, sd["exact"])
    rel = {}
    for e in ("forward", "central"):
        total = jax.tree.map(jnp.add, g_primary, sd[e])
        cos_total = float(tree_vdot(total, exact_total) / (tree_norm(total) * tree_norm(exact_total)))
        assert cos_total > 0.9999, (e, cos_total)
        diff = jax.tree.map(jnp.subtract, sd[e], sd["exact"])
        rel[e] = float(tree_norm(diff) / tree_norm(sd["exact"]))
    # feasibility.md §4 measured ≈ C·ε with C ≈ 1–3.6 for forward (here 2.6e-3) and 1–3e-4 for
    # central (here 1.2e-4) in float32
    assert rel["forward"] < 5e-3, rel
    assert rel["central"] < 1e-3 and rel["central"] < rel["forward"] / 4, rel
    # and the full method returns primary + β·sd
    expected = jax.tree.map(lambda a, b: a + 1.6 * b, g_primary, sd["forward"])
    err = float(tree_norm(jax.tree.map(jnp.subtract, grads, expected)) / tree_norm(expected))
    assert err < 1e-5
    assert set(metrics) >= {"l_ul", "l_up", "cos", "grad_norm_a", "grad_norm_b", "grad_norm_sd", "loss"}
    assert -1.0 <= float(metrics["cos"]) <= 1.0


@pytest.mark.parametrize("gamma", [0.6])
def test_exact_update_is_the_gradient_of_the_composed_scalar_in_float64(params, data, gamma):
    """estimator "exact": grads = ∇[L_ul + α·L_up + γ·ℓ_ben + β·cos(∇ℓ_adv, ∇ℓ_ben)] by autodiff of the whole scalar."""
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        batches = {k: {f: jnp.asarray(x) for f, x in v.items()} for k, v in data.batches(2).items()}
        m = SEAM(cfg=CFG, alpha=0.7, beta=1.6, estimator="exact", unlearning="log", gamma=gamma)
        official = SEAM(cfg=CFG, alpha=0.7, beta=1.6, estimator="exact", unlearning="log")

        def composed(p):
            adv, aln, ben = m.masked_batches(batches)
            primary = official.primary_loss(p, adv, aln)[0] + gamma * m.ce_loss(p, ben)
            g_a, g_b = jax.grad(m.ce_loss)(p, adv), jax.grad(m.ce_loss)(p, ben)
            return primary + 1.6 * tree_vdot(g_a, g_b) / (tree_norm(g_a) * tree_norm(g_b))

        ref = jax.jit(jax.grad(composed))(p64)
        got, metrics = jax.jit(lambda p: m.grad(p, batches, None, None))(p64)
        err = float(tree_norm(jax.tree.map(jnp.subtract, got, ref)) / tree_norm(ref))
        assert err < 1e-6, err  # 4e-8 measured: float32 RoPE tables and curvature accumulations
        assert jax.tree.leaves(got)[0].dtype == jnp.float64



def _count_dots(jaxpr):
    """dot_general equations in a jaxpr and the jaxprs nested in its equations."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_dots(inner)
    return n


def test_exact_gamma_term_reuses_the_benign_gradient(params, data):
    """estimator "exact", γ = 0.6: γ·g_b takes g_b from cosine_grad's linearised pass, so the traced
    update has as many matmuls as γ = 0 (a second benign gradient adds 31 on the tiny model).
    Its value is test_exact_update_is_the_gradient_of_the_composed_scalar_in_float64."""
    batches = {k: {f: jnp.asarray(x) for f, x in v.items()} for k, v in data.batches(2).items()}
    dots = {gamma: _count_dots(jax.make_jaxpr(SEAM(cfg=CFG, alpha=0.7, beta=1.6, estimator="exact",
                                                   gamma=gamma).grad)(params, batches).jaxpr)
            for gamma in (0.0, 0.6)}
    assert dots[0.0] > 0 and dots[0.6] == dots[0.0], dots

def test_get_method_builds_and_coerces():
    m = get_method("seam", cfg=CFG, beta="1.5", estimator="exact", benign_full_sequence=False)
    assert isinstance(m, SEAM) and m.beta == 1.5 and m.estimator == "exact" and m.benign_full_sequence is False
    streams = m.streams()
    assert list(streams) == ["adversarial", "alignment", "benign"]
    assert (streams["adversarial"].source, streams["adversarial"].half) == ("harmful_qa", "defender")
    assert (streams["alignment"].source, streams["alignment"].pair_with) == ("refusal", "adversarial")
    assert hash(m) == hash(SEAM(cfg=CFG, beta=1.5, estimator="exact", benign_full_sequence=False))
    assert SEAM().eps == 1e-3 and SEAM().alpha == 1.0 and SEAM().beta == 0.01 and SEAM().estimator == "forward"


@functools.lru_cache(maxsize=None)
def _cos_fn(method):
    @jax.jit
    def cos(p, batches):
        adv, _, ben = method.masked_batches(batches)
        g_a = jax.grad(method.ce_loss)(p, adv)
        g_b = jax.grad(method.ce_loss)(p, ben)
        return tree_vdot(g_a, g_b) / (tree_norm(g_a) * tree_norm(g_b))

    return cos


def _held_out_cos(method, params, data, steps=(0, 1)):
    return float(np.mean([_cos_fn(method)(params, data.batches(s, held_out=True)) for s in steps]))


def test_seam_lowers_held_out_gradient_cosine(params, data):
    """30 steps of SEAM (β = 1, forward estimator) through the one training loop."""
    from jaxdefense.train import train

    method = SEAM(cfg=CFG, beta=1.0)
    streams = {name: StreamView(data, name) for name in method.streams()}
    before = _held_out_cos(method, params, data)
    result = train(params, method.grad, streams, optax.adam(3e-3), steps=30, log_every=10, progress=False)
    after = _held_out_cos(method, result.params, data)
    logged = [r["cos"] for r in result.history]
    # measured: −0.05 → −0.95 (β = 0 ends at −0.19 on the same data)
    assert after < before - 0.3 and after < -0.6, (before, after, logged)
    assert logged[-1] < logged[0]


@pytest.mark.parametrize("name, hparams, needle", [
    ("nope", {}, "method.name: unknown method 'nope' (known: booster, circuit_breakers, "),
    ("seam", {"zeta": 1.0}, "method.zeta: unknown key"),
    ("seam", {"beta": "lots"}, "method.beta: expected float"),
    ("seam", {"beta": -1.0}, "method.beta: must be >= 0"),
    ("seam", {"estimator": "backward"}, "method.estimator: 'backward' is not one of"),
    ("seam", {"eps": 0.0}, "method.eps: must be > 0"),
    ("seam", {"benign_full_sequence": "maybe"}, "method.benign_full_sequence: expected bool"),
])
def test_get_method_rejects_bad_names_and_values(name, hparams, needle):
    from jaxdefense.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        get_method(name, **hparams)
    assert needle in str(err.value)

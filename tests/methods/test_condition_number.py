"""Condition-number regularisers: r1 vanishes exactly for equal eigenvalues, r1/r2 gradients match the
analytic eigenvalue gradient and finite differences in float64, the float64 host eigendecomposition
under float32 training matches the in-graph float64 one, and the method's loss equals a reference
written from the official reg_loss on the tiny model."""

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
from jaxdefense.methods.condition_number import (
    ConditionNumber,
    extreme_eigs,
    feature_gram,
    hessian_condition,
    r_ill,
    r_well,
)
from jaxdefense.models import forward, lm_loss, named_config

CFG = named_config("tiny")
REPO = Path(__file__).resolve().parents[2]
CN_TINY = str(REPO / "jaxdefense" / "configs" / "condition_number_tiny.yaml")


def _orthogonal(rng, k):
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return q


def test_r1_is_zero_for_equal_eigenvalues_and_positive_otherwise():
    rng = np.random.default_rng(0)
    q = _orthogonal(rng, 6)
    with jax.enable_x64(True):
        s = jnp.asarray(q @ np.diag(np.full(6, 2.5)) @ q.T)
        _, top = extreme_eigs(s, jitter=0.0)
        assert abs(float(r_well(s, top))) < 1e-12
        # the official jitter shifts σ_max only: r1 = ((c + j)² − c²)/2
        _, top = extreme_eigs(s, jitter=1e-6)
        np.testing.assert_allclose(float(r_well(s, top)), ((2.5 + 1e-6) ** 2 - 2.5**2) / 2, rtol=1e-6)
        spread = jnp.asarray(q @ np.diag([1.0, 2, 3, 4, 5, 6]) @ q.T)
        _, top = extreme_eigs(spread, jitter=0.0)
        np.testing.assert_allclose(float(r_well(spread, top)), 36 / 2 - 91 / 12, rtol=1e-12)


def _features(rng, n=9, k=5):
    return rng.standard_normal((n, k)) @ np.diag([3.0, 1.5, 1.0, 0.6, 0.2])


def _regs(phi, jitter=1e-6):
    s = phi.T @ phi
    lo, hi = extreme_eigs(s, jitter=jitter)
    return r_well(s, hi), r_ill(s, lo)


def test_regulariser_gradients_match_the_eigenvalue_formula_and_finite_differences_in_float64():
    """∂r1/∂S = σ_max v vᵀ − S/K (official S1_gradients); ∂r2/∂S = −r2²(S/K − σ_min u uᵀ); ∂/∂Φ by
    central differences."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        phi = jnp.asarray(_features(rng))
        s = phi.T @ phi
        k = s.shape[0]
        w, v = np.linalg.eigh(np.asarray(s) + 1e-6 * np.eye(k))
        g1 = jax.grad(lambda m: r_well(m, extreme_eigs(m)[1]))(s)
        np.testing.assert_allclose(g1, w[-1] * np.outer(v[:, -1], v[:, -1]) - np.asarray(s) / k, rtol=1e-9, atol=1e-9)
        r2 = float(r_ill(s, extreme_eigs(s)[0]))
        g2 = jax.grad(lambda m: r_ill(m, extreme_eigs(m)[0]))(s)
        np.testing.assert_allclose(g2, -r2**2 * (np.asarray(s) / k - w[0] * np.outer(v[:, 0], v[:, 0])),
                                   rtol=1e-9, atol=1e-14)

        direction = jnp.asarray(rng.standard_normal(phi.shape))
        for i in range(2):
            grad = jax.grad(lambda p, i=i: _regs(p)[i])(phi)
            eps = 1e-5
            fd = (_regs(phi + eps * direction)[i] - _regs(phi - eps * direction)[i]) / (2 * eps)
            np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(fd), rtol=1e-7)


def test_float64_host_eigendecomposition_under_float32_matches_float64():
    """Without x64, eig_dtype float64 decomposes on the host in float64 (jax.pure_callback): σ_min of an
    ill-conditioned S is exact where float32 eigvalsh is not, and its gradient is v vᵀ."""
    rng = np.random.default_rng(2)
    q = _orthogonal(rng, 8)
    eig = np.array([1e4, 3e3, 1e3, 10, 1, 0.1, 3e-3, 1e-3])
    s64 = q @ np.diag(eig) @ q.T
    s32 = jnp.asarray(s64, jnp.float32)
    lo, hi = jax.jit(lambda m: extreme_eigs(m, jitter=0.0))(s32)
    ref = np.linalg.eigvalsh(np.asarray(s32, np.float64))
    assert lo.dtype == jnp.float32
    np.testing.assert_allclose([float(lo), float(hi)], [ref[0], ref[-1]], rtol=1e-6)
    lo32, _ = jax.jit(lambda m: extreme_eigs(m, jitter=0.0, eig_dtype="float32"))(s32)
    assert abs(float(lo32) - ref[0]) > 10 * abs(float(lo) - ref[0])  # float32 eigvalsh loses σ_min
    g = jax.jit(jax.grad(lambda m: extreme_eigs(m, jitter=0.0)[0]))(s32)
    _, vecs = np.linalg.eigh(np.asarray(s32, np.float64))
    np.testing.assert_allclose(g, np.outer(vecs[:, 0], vecs[:, 0]), atol=1e-5)


def _jnp(batches, rows=4):
    return {k: {f: jnp.asarray(x[:rows]) for f, x in v.items()} for k, v in batches.items()}


def _reference_loss(params, batches, layer, lam1, lam2):
    """Official reg_loss on the selected tokens' features, written with numpy-chosen rows."""
    def feats(batch):
        _, hidden = forward(CFG, params, batch["input_ids"], attention_mask=batch["attention_mask"],
                            return_hidden=True)
        b, t = np.nonzero(np.asarray(batch["attention_mask"]))
        return hidden[layer][b, t]

    x1, x2 = feats(batches["benign"]), feats(batches["adversarial"])
    s1, s2 = x1.T @ x1, x2.T @ x2
    k = s1.shape[0]
    e1 = jnp.linalg.eigvalsh(s1 + 1e-6 * jnp.eye(k))
    e2 = jnp.linalg.eigvalsh(s2 + 1e-6 * jnp.eye(k))
    r1 = jnp.max(e1) ** 2 / 2 - jnp.linalg.norm(s1) ** 2 / (2 * k)
    r2 = 1 / (jnp.linalg.norm(s2) ** 2 / (2 * k) - jnp.min(e2) ** 2 / 2)
    return lm_loss(CFG, params, batches["benign"]) + lam1 * r1 + lam2 * r2, (r1, r2, e1, e2)


def test_method_gradient_is_the_official_loss_in_float64_and_float32(params, data):
    batches = _jnp(data.batches(5))
    lam1, lam2, layer = 0.5, 7e2, 1
    m = get_method("condition_number", CFG, lam_r1=lam1, lam_r2=lam2, layer=layer)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        (ref_loss, (r1, r2, e1, e2)), ref = jax.value_and_grad(
            lambda p: _reference_loss(p, batches, layer, lam1, lam2), has_aux=True)(p64)
        got, metrics = jax.jit(lambda p: m.grad(p, batches))(p64)
        assert jax.tree.leaves(got)[0].dtype == jnp.float64
        err = float(tree_norm(jax.tree.map(jnp.subtract, got, ref)) / tree_norm(ref))
        assert err < 1e-9, err
        np.testing.assert_allclose([float(metrics[k]) for k in ("loss", "r1", "r2")],
                                   [float(ref_loss), float(r1), float(r2)], rtol=1e-10)
        np.testing.assert_allclose(float(metrics["kappa_harm"]), float(e2[-1] / e2[0]), rtol=1e-8)
        np.testing.assert_allclose(float(metrics["log_kappa_benign"]), float(np.log(e1[-1] / e1[0])), rtol=1e-8)
        assert lam1 * float(r1) > 0.01 and lam2 * float(r2) > 0.01  # both terms matter at these weights
        ref = jax.tree.map(lambda x: np.asarray(x, np.float32), ref)
    got32, metrics32 = jax.jit(lambda p: m.grad(p, batches))(params)  # host float64 eigh inside float32
    err = float(tree_norm(jax.tree.map(jnp.subtract, got32, ref)) / tree_norm(ref))
    assert err < 1e-3, err
    np.testing.assert_allclose(float(metrics32["r2"]), float(r2), rtol=1e-3)


def test_config_errors_and_streams():
    with pytest.raises(ConfigError, match="method.layer"):
        ConditionNumber(layer=CFG.num_layers + 1).bind(CFG)
    with pytest.raises(ConfigError, match="tokens"):
        ConditionNumber(tokens="prompt")
    assert ConditionNumber(layer=-(CFG.num_layers + 1)).bind(CFG).layer == -(CFG.num_layers + 1)
    streams = ConditionNumber().streams()
    assert (streams["adversarial"].source, streams["adversarial"].half) == ("harmful_qa", "defender")
    assert streams["benign"].source == "benign_instruct"
    d = ConditionNumber()
    assert (d.lam_r1, d.lam_r2, d.jitter, d.gram, d.eig_dtype) == (3e-6, 3e8, 1e-6, "sum", "float64")
    mask = jnp.asarray([[1, 1, 0]])
    h = jnp.arange(6.0).reshape(1, 3, 2)
    np.testing.assert_allclose(feature_gram(h, mask), [[4.0, 6.0], [6.0, 10.0]])  # rows [0, 1], [2, 3]
    np.testing.assert_allclose(feature_gram(h, mask, "mean"), [[2.0, 3.0], [3.0, 5.0]])


@pytest.mark.slow
def test_hessian_condition_is_shift_covariant_under_damping(params, data):
    """Lanczos on G + d·I from the same start: every Ritz value moves by d (Krylov spaces are shift
    invariant), so λ_max, λ_min shift by d and κ ≥ 1."""
    batch = _jnp(data.batches(0), rows=2)["adversarial"]
    key = jax.random.key(3)
    run = jax.jit(lambda p, d: hessian_condition(CFG, p, batch, key, num_iters=6, damping=d))
    k0, lo0, hi0 = run(params, 0.0)
    k1, lo1, hi1 = run(params, 0.5)
    np.testing.assert_allclose([float(lo1 - lo0), float(hi1 - hi0)], [0.5, 0.5], rtol=1e-3)
    assert float(hi0) > 0 and float(k1) >= 1
    np.testing.assert_allclose(float(k1), float(hi1 / lo1), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not data_root_available(), reason="shared data root not found")
def test_cli_round_trip(tmp_path):
    from jaxdefense.cli import main
    from jaxdefense.train import read_metrics

    out = tmp_path / "cn"
    assert main(["immunize", "--config", CN_TINY, "--out", str(out), "--set", "steps=2", "--set", "log_every=1",
                 "--set", "data.streams.adversarial.limit=32", "--set", "data.batch_size=4",
                 "--set", "data.max_len=48", "--no-progress"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[-1]["kappa_harm"] >= 1 and rows[-1]["kappa_benign"] >= 1 and rows[-1]["r1"] >= 0
    assert (out / "hf" / "model.safetensors").is_file()

"""T-Vaccine on the tiny random model: layers are drawn with the stated probabilities, p holds
over each K-interval and the set over each J-interval (host state, resumed bit-identically), the
update is Vaccine's on the drawn layers, a step specialised on the top layer plans less memory,
and the real train step leaves everything outside the set bit-identical (full and LoRA)."""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from perturbed_reference import as_jnp, perturbed_ce, rel_err, to64, zero_deltas
from scipy.stats import chi2

from jaxdefense.data import data_root_available
from jaxdefense.methods import get_method
from jaxdefense.methods.t_vaccine import TVaccine, harmful_scores, sample_layers
from jaxdefense.models import named_config
from jaxdefense.objective import CARRY, STATIC, STEP, UPDATE_MASK, LoRA, Static
from jaxdefense.train.loop import make_step

CFG = named_config("tiny")
REPO = Path(__file__).resolve().parents[2]
T_VACCINE_TINY = str(REPO / "jaxdefense" / "configs" / "t_vaccine_tiny.yaml")
DRAWS = 6000


def _batches(data, step, dtype=None):
    raw = data.batches(step)
    return as_jnp({"alignment": raw["alignment"], "harmful": raw["adversarial"]}, dtype)


def _draws(p, gamma):
    keys = jax.random.split(jax.random.key(123), DRAWS)
    return np.asarray(jax.jit(jax.vmap(lambda k: sample_layers(k, jnp.asarray(p), gamma)))(keys))


def _chi2(counts, expected):
    return float(np.sum((counts - expected) ** 2 / expected))


def test_single_layer_draws_follow_p_chi_square():
    p = np.array([0.05, 0.1, 0.15, 0.3, 0.4])
    draws = _draws(p, 1)
    assert (draws.sum(axis=1) == 1).all()
    counts = draws.sum(axis=0)
    assert _chi2(counts, DRAWS * p) < chi2.ppf(0.999, len(p) - 1)
    assert _chi2(counts, np.full(5, DRAWS / 5)) > chi2.ppf(0.999999, len(p) - 1)  # the test has power


def test_layer_sets_follow_sampling_without_replacement_chi_square():
    """γ = 2 of 4: P({i, j}) = p_i p_j/(1 − p_i) + p_j p_i/(1 − p_j) (np.random.choice(replace=False, p))."""
    p = np.array([0.1, 0.2, 0.3, 0.4])
    draws = _draws(p, 2)
    assert (draws.sum(axis=1) == 2).all()
    pairs = list(itertools.combinations(range(4), 2))
    counts = np.array([np.sum(draws[:, i] & draws[:, j]) for i, j in pairs])
    expected = DRAWS * np.array([p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs])
    np.testing.assert_allclose(expected.sum(), DRAWS)
    assert _chi2(counts, expected) < chi2.ppf(0.999, len(pairs) - 1)
    assert _chi2(counts, np.full(len(pairs), DRAWS / len(pairs))) > chi2.ppf(0.999999, len(pairs) - 1)


def _collect(m, params, batches, frozen, step, carry):
    out = m.collect(params, {**batches, STEP: np.int32(step), CARRY: carry}, None, frozen)
    return out, out.pop(CARRY)


def test_probabilities_every_k_and_layer_set_every_j(params, data):
    """Host schedule: p is the harmful batch's p at the last multiple of K, S is redrawn at each
    multiple of J from the p of that step, and both pass through the carry unchanged in between."""
    m = TVaccine(cfg=CFG, gamma=1, switch_every=3, probability_every=6)
    _, frozen = m.init(params, jax.random.key(5))
    carry, sets, ps = None, [], []
    for step in range(24):
        out, carry = _collect(m, params, _batches(data, step), frozen, step, carry)
        sets.append(out[STATIC].value)
        ps.append(np.asarray(out["layer_scores"]["p"][0]))
        assert "harmful" not in out and out[STATIC].value == tuple(carry["layers"])
    for start in range(0, 24, 3):
        assert len(set(sets[start:start + 3])) == 1, sets
    assert len(set(sets)) == 2, sets  # both layers drawn over 8 intervals
    assert all(len(s) == 1 for s in sets)
    for step in range(24):
        refresh = step - step % 6
        expected, _ = harmful_scores(CFG, params, _batches(data, refresh)["harmful"])
        np.testing.assert_array_equal(ps[step], np.asarray(expected))
    assert not np.array_equal(ps[0], ps[6])  # a refresh reads a new batch


def test_update_is_vaccine_on_the_drawn_layers_in_float64(params, data):
    """p_l = ‖∂CE_harm/∂δ_l‖/Σ; ε on the drawn layer only, normed over it; grads only for it."""
    with jax.enable_x64(True):
        p64, batches = to64(params), _batches(data, 3, jnp.float64)
        m = TVaccine(cfg=CFG, rho=2.5, gamma=1, switch_every=4, probability_every=3)
        _, frozen = m.init(p64, jax.random.key(9))
        prepared, _ = _collect(m, p64, batches, frozen, 6, None)
        got, metrics = jax.jit(m.grad)(p64, prepared, None, frozen)

        @jax.jit
        def hidden_grad(batch):
            return jax.grad(lambda ds: perturbed_ce(CFG, p64, batch, ds))(zero_deltas(CFG, batch, jnp.float64))

        s = np.array([float(jnp.sqrt(jnp.sum(x * x))) for x in hidden_grad(batches["harmful"])])
        np.testing.assert_allclose([float(metrics[f"p_l{i}"]) for i in range(CFG.num_layers)], s / s.sum(), rtol=1e-10)
        active = [bool(metrics[f"active_l{i}"]) for i in range(CFG.num_layers)]
        assert sum(active) == 1 and prepared[STATIC].value == (active.index(True),)
        g = hidden_grad(batches["alignment"])
        norm = jnp.sqrt(sum(jnp.sum(x * x) for x, a in zip(g, active) if a))
        eps = [2.5 * x / (norm + 1e-7) if a else 0 * x for x, a in zip(g, active)]
        value, ref = jax.jit(jax.value_and_grad(lambda p: perturbed_ce(CFG, p, batches["alignment"], eps)))(p64)
        keep = np.array(active)
        ref = {k: jax.tree.map(jnp.zeros_like, v) for k, v in ref.items() if k != "layers"} | {
            "layers": jax.tree.map(lambda x: x * keep.reshape((-1,) + (1,) * (x.ndim - 1)), ref["layers"])}
        assert rel_err(got, ref) < 1e-9
        np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-12)
        np.testing.assert_allclose(float(metrics["hidden_grad_norm"]), float(norm), rtol=1e-10)
        mask = metrics[UPDATE_MASK]
        assert jax.tree.structure(mask) == jax.tree.structure(got)
        assert not any(bool(x) for k, v in mask.items() if k != "layers" for x in jax.tree.leaves(v))
        for x in jax.tree.leaves(got["layers"]):
            assert float(jnp.abs(x[keep.argmin()]).max()) == 0.0 and float(jnp.abs(x[keep.argmax()]).max()) > 0


def test_step_specialised_on_the_top_layer_plans_less_memory(params, data):
    """XLA memory analysis of grad: S = {1} runs no backward through layer 0 and holds no weight
    gradient for it, so it plans fewer temporary bytes than S = {0, 1} (every layer: Vaccine's
    footprint)."""
    m = TVaccine(cfg=CFG, gamma=1)
    _, frozen = m.init(params, jax.random.key(0))
    prepared, _ = _collect(m, params, _batches(data, 0), frozen, 0, None)

    def temp(layers):
        batches = {**prepared, STATIC: Static(layers)}
        return jax.jit(m.grad).lower(params, batches, None, frozen).compile().memory_analysis().temp_size_in_bytes

    top, every = temp((1,)), temp((0, 1))
    assert top < 0.8 * every, (top, every)


def _bits(x):
    return np.asarray(x).view(np.uint32)


def _layer_leaves(tree):
    return jax.tree.leaves(tree)


def _check_steps(objective, trainable, frozen, batches_at, layer_slices, steps=6):
    """Run the real jitted train step after `collect` (the loop's order); after each, every leaf of
    the layers not drawn (and its Adam mu/nu) is bit-identical to before; the drawn layer's leaves
    moved. Returns the drawn sets."""
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    step = jax.jit(make_step(objective.grad, optimizer))
    state = optimizer.init(trainable)
    drawn, carry = [], None
    for i in range(steps):
        before, state_before = jax.device_get(trainable), jax.device_get(state)
        batches, carry = _collect(objective, trainable, batches_at(i), frozen, i, carry)
        trainable, state, metrics, ok, _ = step(trainable, state, batches, frozen, jax.random.key(0), np.int32(i))
        assert bool(ok) and UPDATE_MASK not in metrics
        active = [bool(metrics[f"active_l{k}"]) for k in range(CFG.num_layers)]
        drawn.append(active)
        after, state_after = jax.device_get(trainable), jax.device_get(state)
        pairs = [(before, after), (state_before[0].mu, state_after[0].mu), (state_before[0].nu, state_after[0].nu)]
        for k, a in enumerate(active):
            same = [np.array_equal(_bits(x[k]), _bits(y[k])) for old, new in pairs
                    for x, y in zip(layer_slices(old), layer_slices(new))]
            assert all(same) if not a else not all(same[:len(layer_slices(before))]), (i, k, a, same)
    return drawn, trainable


def test_train_step_leaves_unsampled_layers_bit_identical(params, data):
    """Through `train.loop.make_step` with AdamW (weight decay 0.1): momentum built while a layer was
    drawn does not move it once it is not; the embedding, final norm and head never move."""
    m = TVaccine(cfg=CFG, gamma=1, switch_every=1)
    trainable, frozen = m.init(params, jax.random.key(3))
    batches = {i: _batches(data, i) for i in range(6)}
    drawn, final = _check_steps(m, trainable, frozen, batches.__getitem__, lambda t: _layer_leaves(t["layers"]))
    assert any(d[0] for d in drawn) and any(d[1] for d in drawn), drawn
    for name in ("embed", "final_norm", "lm_head"):
        if name in trainable:
            np.testing.assert_array_equal(_bits(trainable[name]), _bits(final[name]))
    assert any(drawn[i] != drawn[i + 1] for i in range(5)), drawn


@pytest.mark.slow
def test_lora_wrapped_update_leaves_unsampled_adapters_bit_identical(params, data):
    m = LoRA(cfg=CFG, inner=TVaccine(cfg=CFG, gamma=1, switch_every=1), rank=4, alpha=8.0, targets=("wq", "wv"))
    trainable, frozen = m.init(params, jax.random.key(3))
    assert set(trainable) == {"wq", "wv"} and m.collects
    batches = {i: _batches(data, i) for i in range(6)}
    drawn, _ = _check_steps(m, trainable, frozen, batches.__getitem__, _layer_leaves)
    assert any(d[0] for d in drawn) and any(d[1] for d in drawn), drawn


class _Stream:
    def __init__(self, data, name):
        self.data, self.name = data, name

    def batch_at(self, step):
        return {k: np.asarray(v) for k, v in _batches(self.data, step)[self.name].items()}


@pytest.mark.slow
def test_resumed_run_draws_the_same_sets_bit_identical(tmp_path, params, data):
    """`train.loop.train` with collect: a run resumed at step 3 (inside a J- and a K-interval: its p
    and S come from the checkpointed carry) ends bit-identical to the uninterrupted run."""
    from jaxdefense.train.loop import train

    m = TVaccine(cfg=CFG, gamma=1, switch_every=2, probability_every=4)
    trainable, frozen = m.init(params, jax.random.key(4))
    streams = {name: _Stream(data, name) for name in ("alignment", "harmful")}
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    kw = dict(frozen=frozen, optimizer=optimizer, collect=m.collect, log_every=1, progress=False,
              mesh=None, seed=0)
    whole = train(trainable, m.grad, streams, steps=4, **kw)
    train(trainable, m.grad, streams, steps=3, run_dir=tmp_path, **kw)
    resumed = train(trainable, m.grad, streams, steps=4, run_dir=tmp_path, resume=True, **kw)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    assert [(r["active_l0"], r["p_l0"]) for r in whole.history[3:]] == [(r["active_l0"], r["p_l0"]) for r in resumed.history]
    assert whole.history[3]["p_l0"] == whole.history[0]["p_l0"]  # step 3 reads the p of step 0


def test_defaults_and_streams():
    m = get_method("t_vaccine", CFG)
    assert (m.rho, m.gamma, m.switch_every, m.probability_every) == (3.0, 8, 20, 200)
    assert m.streams()["harmful"].source == "harmful_qa" and m.streams()["alignment"].source == "refusal"
    assert set(TVaccine.cost_variants) == {"g1", "g2", "g8"} and TVaccine.collects


@pytest.mark.slow
def test_gamma_is_capped_at_the_depth(params, data):
    m = get_method("t_vaccine", CFG)
    _, frozen = m.init(params, jax.random.key(0))
    prepared, _ = _collect(m, params, _batches(data, 0), frozen, 0, None)
    _, metrics = jax.jit(m.grad)(params, prepared, None, frozen)  # γ = 8 > 2 layers: every layer
    assert all(float(metrics[f"active_l{i}"]) == 1.0 for i in range(CFG.num_layers))


@pytest.mark.slow
@pytest.mark.skipif(not data_root_available(), reason="shared data root not found")
def test_cli_run(tmp_path):
    from jaxdefense.cli import main
    from jaxdefense.train import read_metrics

    out = tmp_path / "t_vaccine"
    assert main(["immunize", "--config", T_VACCINE_TINY, "--out", str(out), "--set", "steps=2", "--set", "log_every=1",
                 "--set", "data.batch_size=4", "--set", "data.max_len=48", "--no-progress"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    assert sum(rows[0][f"active_l{i}"] for i in range(2)) == 1
    np.testing.assert_allclose(rows[0]["p_l0"] + rows[0]["p_l1"], 1.0, rtol=1e-6)
    assert (out / "hf" / "model.safetensors").is_file()

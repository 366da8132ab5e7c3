"""TAR on the tiny random model: the first-order update is the official accumulation written out by hand,
the exact update is autodiff of the hand-unrolled objective (float64, K = 3), the adversary is drawn from
`key` (reproducible), the schedule is the official one, and the CLI runs it."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense.curvature import tree_norm
from jaxdefense.data import data_root_available
from jaxdefense.errors import ConfigError
from jaxdefense.methods import get_method
from jaxdefense.methods.tar import TAR, schedule_weights
from jaxdefense.models import forward, named_config

CFG = named_config("tiny")
REPO = Path(__file__).resolve().parents[2]
TAR_TINY = str(REPO / "jaxdefense" / "configs" / "tar_tiny.yaml")
K, ROWS, WDECAY, SCALE, LAM, RETAIN = 3, 4, 0.05, 2.5, 0.5, 0.6


def _jnp(batches):
    return {k: {f: jnp.asarray(x) for f, x in v.items()} for k, v in batches.items()}


def _rel(a, b):
    return float(tree_norm(jax.tree.map(jnp.subtract, a, b)) / tree_norm(b))


def _ce(p, batch):
    logits = forward(CFG, p, batch["input_ids"], attention_mask=batch["attention_mask"])[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    on = batch["loss_mask"][:, 1:]
    return -jnp.sum(picked * on) / jnp.sum(on)


def _neg_entropy(p, batch):
    """Official max_entropy_loss over the real tokens: −mean H(softmax(logits))."""
    prob = jax.nn.softmax(forward(CFG, p, batch["input_ids"], attention_mask=batch["attention_mask"]), axis=-1)
    h = -jnp.sum(prob * jnp.log(prob), axis=-1)
    mask = batch["attention_mask"]
    return -jnp.sum(h * mask) / jnp.sum(mask)


def _retain(p, ref, batch):
    """Official obj_model_mse_representations: CE + mean over the L+1 hidden states (last final-normed) of the
    token-mean Euclidean distance to the frozen model."""
    def states(q):
        _, h = forward(CFG, q, batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)
        last = h[-1] * jax.lax.rsqrt(jnp.mean(h[-1] ** 2, -1, keepdims=True) + CFG.rms_norm_eps) * q["final_norm"]
        return [h[i] for i in range(h.shape[0] - 1)] + [last]

    mask = batch["attention_mask"]
    dists = []
    for a, b in zip(states(p), states(ref)):
        sq = jnp.sum((a - b) ** 2, -1)
        dists.append(jnp.sum(jnp.sqrt(jnp.where(sq > 0, sq, 1.0)) * (sq > 0) * mask) / jnp.sum(mask))
    return _ce(p, batch) + sum(dists) / len(dists)


def _step_batches(batches, switch, m):
    """Inner step k's batch: retain rows [4k mod 8, +4) while switch and k < M, else the harmful ones."""
    out = []
    for k in range(K):
        src = batches["retain"] if (switch and k < m) else batches["adversarial"]
        lo = (k % 2) * ROWS
        out.append({f: x[lo:lo + ROWS] for f, x in src.items()})
    return out


def _trajectory(p, steps_batches, lr, optimizer):
    """θ_0..θ_K under torch AdamW (decoupled decay) or SGD with decay."""
    thetas, m, v = [p], jax.tree.map(jnp.zeros_like, p), jax.tree.map(jnp.zeros_like, p)
    for k, batch in enumerate(steps_batches):
        th = thetas[-1]
        g = jax.grad(_ce)(th, batch)
        if optimizer == "sgd":
            thetas.append(jax.tree.map(lambda x, d: x - lr * (d + WDECAY * x), th, g))
            continue
        m = jax.tree.map(lambda a, d: 0.9 * a + 0.1 * d, m, g)
        v = jax.tree.map(lambda a, d: 0.999 * a + 0.001 * d * d, v, g)
        c1, c2 = 1 - 0.9 ** (k + 1), 1 - 0.999 ** (k + 1)
        thetas.append(jax.tree.map(lambda x, a, b: x * (1 - lr * WDECAY) - lr * (a / c1) / (jnp.sqrt(b / c2) + 1e-8),
                                   th, m, v))
    return thetas


def _weights():
    return [SCALE * math.exp(LAM * (i - (K - 1))) for i in range(K)]  # for θ_1..θ_K (subsample 1)


@pytest.mark.slow  # ~45 s idle: compiling the float64 unrolled graphs
@pytest.mark.parametrize("seed", [0])
def test_first_order_is_the_official_accumulation_and_exact_is_autodiff_in_float64(params, data, seed):
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        raw = _jnp(data.batches(2))
        batches = {"adversarial": raw["adversarial"], "forget": _jnp(data.batches(5))["adversarial"],
                   "retain": raw["benign"]}
        m = TAR(cfg=CFG, steps=K, lrs=(3e-3, 1e-2), optimizers=("adamw",), weight_decay=WDECAY, tr_scale=SCALE,
                schedule_lambda=LAM, subsample=1, retain_weight=RETAIN, switch_prob=1.0, adversary_batch_size=ROWS)
        key = jax.random.key(seed)
        lr, opt, switch, m_step = (np.asarray(x) for x in m.sample_adversary(key))
        optimizer, lr, m_step = m.optimizers[int(opt)], float(lr), int(m_step)
        assert bool(switch) and 0 <= m_step <= K
        steps_batches = _step_batches(batches, True, m_step)
        ref_params = jax.tree.map(lambda x: x + 0.01 * jnp.sin(x * 37.0), p64)  # θ ≠ θ_frozen

        def objective(p):
            thetas = _trajectory(p, steps_batches, lr, optimizer)
            tr = sum(w * _neg_entropy(t, batches["forget"]) for w, t in zip(_weights(), thetas[1:]))
            return tr + RETAIN * _retain(p, ref_params, batches["retain"])

        ref_value, ref_grad = jax.jit(jax.value_and_grad(objective))(p64)
        frozen = {"reference": ref_params}
        first = jax.jit(lambda p, k: m.grad(p, batches, k, frozen))
        fo, fo_metrics = first(p64, key)

        @jax.jit
        def fo_reference(p):
            thetas = _trajectory(p, steps_batches, lr, optimizer)
            g_tr = [jax.grad(_neg_entropy)(t, batches["forget"]) for t in thetas[1:]]  # ∇ at each θ_k, held constant
            return jax.tree.map(lambda r, *gs: RETAIN * r + sum(w * g for w, g in zip(_weights(), gs)),
                                jax.grad(_retain)(p, ref_params, batches["retain"]), *g_tr)

        fo_ref = fo_reference(p64)
        # AdamW's m/(√v+ε) amplifies float64 rounding of near-zero gradient entries (the hand CE and lm_loss
        # round differently), hence 1e-6 rather than 1e-12
        assert _rel(fo, fo_ref) < 1e-6, _rel(fo, fo_ref)
        np.testing.assert_allclose(float(fo_metrics["loss"]), float(ref_value), rtol=1e-6)
        assert float(fo_metrics["adversary_lr"]) == lr and float(fo_metrics["switch_step"]) == m_step

        exact = TAR(**{**m.hyperparameters(), "order": "exact"}, cfg=CFG)
        got, metrics = jax.jit(lambda p, k: exact.grad(p, batches, k, frozen))(p64, key)
        assert _rel(got, ref_grad) < 1e-6, _rel(got, ref_grad)
        assert _rel(fo, ref_grad) > 1e-4  # the second-order term matters here
        np.testing.assert_allclose(float(metrics["loss"]), float(ref_value), rtol=1e-6)

        # the same key draws the same adversary and update; the draw follows the key
        again, _ = first(p64, key)
        assert _rel(again, fo) == 0.0
        draws = [tuple(float(x) for x in m.sample_adversary(jax.random.key(s))) for s in range(40)]
        assert {d[0] for d in draws} == {float(np.float32(3e-3)), float(np.float32(1e-2))}
        two = TAR(cfg=CFG, optimizers=("adamw", "sgd"), switch_prob=0.5)
        draws = np.array([[float(x) for x in two.sample_adversary(jax.random.key(s))] for s in range(60)])
        assert set(draws[:, 1]) == {0.0, 1.0} and 0.2 < draws[:, 2].mean() < 0.8 and draws[:, 3].max() <= 64


def test_schedule_streams_defaults_and_config_errors():
    w = schedule_weights(64, 4.0, 0.0625, 4)
    assert len(w) == 65 and w[0] == 0.0
    on = [k for k, x in enumerate(w) if x]
    assert on == list(range(4, 65, 4))  # θ_{i+1} after inner steps i = 3, 7, …, 63
    np.testing.assert_allclose([w[k] for k in on], [4.0 * math.exp(0.0625 * ((k - 1) - 63)) for k in on])
    assert w[64] == 4.0
    d = get_method("tar", CFG)
    assert (d.steps, d.lrs, d.optimizers, d.weight_decay, d.tr_scale, d.schedule_lambda, d.subsample, d.order,
            d.adversary_batch_size) == (64, (2e-6, 2e-5, 4e-5), ("adamw",), 0.01, 4.0, 0.0625, 4, "first", 4)
    streams = d.streams()
    assert streams["forget"].source == streams["adversarial"].source == "harmful_qa"
    assert streams["retain"].loss_on == "sequence"
    with pytest.raises(ConfigError, match="tar.optimizers"):
        get_method("tar", CFG, optimizers=("adam", "rmsprop"))
    with pytest.raises(ConfigError, match="tar.lrs"):
        get_method("tar", CFG, lrs=())
    with pytest.raises(ConfigError, match="tar.subsample"):
        get_method("tar", CFG, steps=2, subsample=4)
    with pytest.raises(ConfigError, match="switch_prob"):
        get_method("tar", CFG, switch_prob=1.5)
    assert TAR.cost_variants == {"first": {"order": "first"}, "exact": {"order": "exact"}}


@pytest.mark.slow
@pytest.mark.skipif(not data_root_available(), reason="shared data root not found")
def test_cli_smoke(tmp_path):
    from jaxdefense.cli import main
    from jaxdefense.train import read_metrics

    out = tmp_path / "tar"
    assert main(["immunize", "--config", TAR_TINY, "--out", str(out), "--set", "steps=2", "--set", "log_every=1",
                 "--set", "method.steps=4", "--set", "method.optimizers=[adamw,sgd]",
                 "--set", "data.streams.adversarial.limit=32", "--set", "data.streams.forget.limit=32",
                 "--set", "data.streams.retain.limit=32", "--set", "data.batch_size=4", "--set", "data.max_len=48",
                 "--no-progress"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    last = rows[-1]
    np.testing.assert_allclose(last["loss"], last["l_tr"] + last["l_retain"], rtol=1e-5)
    assert last["l_retain_rep"] > 0  # θ has moved from the frozen start
    assert 0 < last["entropy_last"] <= math.log(CFG.vocab_size) + 1e-4
    assert (out / "hf" / "model.safetensors").is_file()

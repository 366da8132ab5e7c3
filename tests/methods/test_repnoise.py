"""RepNoise on the tiny random model: the MMD is the official kernel estimate, the MLP outputs are
the layers' MLP outputs, the update is the float64 gradient of the official loss for a fixed key,
a short run moves the harmful representations toward noise, and the CLI runs it."""

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
from jaxdefense.methods.repnoise import RepNoise, mlp_outputs, mmd, noise_loss
from jaxdefense.methods.seam import seam_loss_masks
from jaxdefense.models import forward, named_config
from jaxdefense.models.decoder import logits_from_hidden

CFG = named_config("tiny")
REPO = Path(__file__).resolve().parents[2]
REPNOISE_TINY = str(REPO / "jaxdefense" / "configs" / "repnoise_tiny.yaml")


def _jnp(batches):
    return {k: {f: jnp.asarray(x) for f, x in v.items()} for k, v in batches.items()}


def _np_mmd(source, target, kernel_mul=2.0, kernel_num=5):
    """The official MMD_loss.forward, line by line in numpy float64."""
    n = source.shape[0] + target.shape[0]
    total = np.concatenate([source, target], 0)
    total0 = np.broadcast_to(total[None], (n, n, total.shape[1]))
    total1 = np.broadcast_to(total[:, None], (n, n, total.shape[1]))
    l2 = ((total0 - total1) ** 2).sum(2)
    bandwidth = l2.sum() / (n ** 2 - n)
    bandwidth /= kernel_mul ** (kernel_num // 2)
    kernels = sum(np.exp(-l2 / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))
    b = source.shape[0]
    return np.mean(kernels[:b, :b] + kernels[b:, b:] - kernels[:b, b:] - kernels[b:, :b])


@pytest.mark.parametrize("kernel_mul, kernel_num", [(2.0, 5), (1.5, 3)])
def test_mmd_equals_the_official_numpy_estimate(kernel_mul, kernel_num):
    rng = np.random.default_rng(0)
    x = 0.7 * rng.normal(size=(6, 40)) + 0.3
    y = rng.normal(size=(6, 40))
    ref = _np_mmd(x, y, kernel_mul, kernel_num)
    assert ref > 0.05
    with jax.enable_x64(True):
        got = float(mmd(jnp.asarray(x), jnp.asarray(y), kernel_mul, kernel_num))
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    got32 = float(jax.jit(mmd, static_argnums=(2, 3))(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                                                       kernel_mul, kernel_num))
    np.testing.assert_allclose(got32, ref, rtol=1e-4)
    np.testing.assert_allclose(float(mmd(jnp.asarray(y), jnp.asarray(y))), 0.0, atol=1e-6)


def test_noise_loss_is_the_layer_mean_of_masked_flattened_mmds():
    """Official: per layer, hidden ⊙ mask and randn ⊙ mask viewed as [B, T·D], MMD, mean over layers."""
    rng = np.random.default_rng(1)
    L, B, T, D = 3, 4, 5, 6
    reps = 2.0 * rng.normal(size=(L, B, T, D))
    noise = rng.normal(size=(L, B, T, D))
    mask = (rng.random((B, T)) < 0.6).astype(np.float64)
    m = mask[:, :, None]
    ref = np.mean([_np_mmd((reps[l] * m).reshape(B, -1), (noise[l] * m).reshape(B, -1)) for l in range(L)])
    with jax.enable_x64(True):
        got = float(noise_loss(jnp.asarray(reps), jnp.asarray(mask), jnp.asarray(noise)))
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    with jax.enable_x64(True):  # an all-masked batch: every sample is 0, MMD 0 (the official code divides by 0)
        assert float(noise_loss(jnp.asarray(reps), jnp.zeros((B, T)), jnp.asarray(noise))) == 0.0


def _mlp_outputs_by_ablation(params, batch):
    """Layer l's MLP output = its output minus its output with that layer's W_down zeroed (earlier layers intact)."""
    full = forward(CFG, params, batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)[1]
    outs = []
    for layer in range(CFG.num_layers):
        w = params["layers"]["w_down"]
        cut = {**params, "layers": {**params["layers"], "w_down": w.at[layer].set(0.0)}}
        ablated = forward(CFG, cut, batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)[1]
        outs.append(full[layer + 1] - ablated[layer + 1])
    return jnp.stack(outs)


def test_mlp_outputs_are_the_layers_mlp_outputs(params, data):
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        batch = _jnp(data.batches(0))["adversarial"]

        @jax.jit
        def both(p):
            hidden = forward(CFG, p, batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)[1]
            return mlp_outputs(CFG, p, hidden, batch["attention_mask"]), _mlp_outputs_by_ablation(p, batch)

        got, ref = both(p64)
        assert got.shape == (CFG.num_layers, *batch["input_ids"].shape, CFG.hidden_size)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-9, atol=1e-11)


def _masked_ce(logits, ids, mask):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    on = mask[:, 1:]
    return -jnp.sum(picked * on) / jnp.sum(on)


def _official_mmd(x, y):
    """MMD_loss with the broadcast distances and the bandwidth detached (.data), in jnp."""
    total = jnp.concatenate([x, y])
    l2 = jnp.sum((total[None] - total[:, None]) ** 2, -1)
    n = total.shape[0]
    bw = jax.lax.stop_gradient(jnp.sum(l2)) / (n * n - n) / 4.0
    k = sum(jnp.exp(-l2 / (bw * 2.0 ** i)) for i in range(5))
    b = x.shape[0]
    return jnp.mean(k[:b, :b] + k[b:, b:] - k[:b, b:] - k[b:, :b])


def _official_loss(params, batches, key, alpha, beta, representation):
    """rep_noise_loss written out: CE_harmless + β·mean_l MMD + (−α)·log(1 + (CE + Σ_h CE_lens(h))/(L+1))
    (the MLP outputs from `mlp_outputs`, checked against layer ablation above)."""
    adv, aln = seam_loss_masks(batches["adversarial"], batches["alignment"])
    ids, mask = adv["input_ids"], adv["loss_mask"]
    logits, hidden = forward(CFG, params, ids, attention_mask=adv["attention_mask"], return_hidden=True)
    ce = _masked_ce(logits, ids, mask)
    lens = [_masked_ce(logits_from_hidden(CFG, params, h), ids, mask) for h in hidden[:-1]] + [ce]
    harmful = (ce + sum(lens)) / hidden.shape[0] + 1.0
    reps = mlp_outputs(CFG, params, hidden, adv["attention_mask"]) if representation == "mlp" else hidden[1:]
    noise = jax.random.normal(key, reps.shape, reps.dtype)
    B = ids.shape[0]
    m = mask[None, :, :, None]
    mmds = [_official_mmd((reps[l] * m[0]).reshape(B, -1), (noise[l] * m[0]).reshape(B, -1)) for l in range(len(reps))]
    harmless = _masked_ce(forward(CFG, params, aln["input_ids"], attention_mask=aln["attention_mask"]),
                          aln["input_ids"], aln["loss_mask"])
    return harmless + beta * sum(mmds) / len(mmds) - alpha * jnp.log(harmful)


@pytest.mark.parametrize("representation", ["mlp", pytest.param("residual", marks=pytest.mark.slow)])
def test_update_is_the_float64_gradient_of_the_official_loss(params, data, representation):
    alpha, beta = 0.6, 0.7
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        batches = _jnp(data.batches(2))
        key = jax.random.key(3)
        m = RepNoise(cfg=CFG, alpha=alpha, beta=beta, representation=representation)
        value, ref = jax.jit(jax.value_and_grad(lambda p: _official_loss(p, batches, key, alpha, beta,
                                                                         representation)))(p64)
        got, metrics = jax.jit(m.grad)(p64, batches, key)
        err = float(tree_norm(jax.tree.map(jnp.subtract, got, ref)) / tree_norm(ref))
        assert err < 1e-8, err
        np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-10)
        np.testing.assert_allclose(float(metrics["loss"]),
                                   float(metrics["l_harmless"] + beta * metrics["mmd"] + alpha * metrics["l_ul"]),
                                   rtol=1e-12)
        # the MMD term is in the update: another key changes it
        other, _ = jax.jit(m.grad)(p64, batches, jax.random.key(4))
        assert float(tree_norm(jax.tree.map(jnp.subtract, got, other))) > 1e-6 * float(tree_norm(got))



def _shapes(jaxpr):
    """Every aval shape in a jaxpr and the jaxprs nested in its equations (scan, cond, checkpoint)."""
    out = set()
    for eqn in jaxpr.eqns:
        out.update(tuple(v.aval.shape) for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out |= _shapes(inner)
    return out


def test_update_traces_no_bt_v_logits(params, data):
    """Every CE of the update projects only the target positions (`models.vocab`): no [B,T,V]
    array is traced in RepNoise's grad, while `_official_loss` (forward logits, full-vocabulary
    masked CE) has one. Its value equals that loss: test_update_is_the_float64_gradient_of_the_official_loss."""
    batches, key = _jnp(data.batches(5)), jax.random.key(8)
    m = RepNoise(cfg=CFG, alpha=0.6, beta=0.7)
    full_shape = (*batches["adversarial"]["input_ids"].shape, CFG.vocab_size)
    official = jax.make_jaxpr(jax.grad(lambda p: _official_loss(p, batches, key, 0.6, 0.7, "mlp")))(params)
    assert full_shape in _shapes(official.jaxpr)
    assert full_shape not in _shapes(jax.make_jaxpr(m.grad)(params, batches, key).jaxpr)

@pytest.mark.slow
def test_short_run_raises_the_harmful_ce_and_lowers_the_refusal_ce(params, data):
    """25 steps of Adam 1e-3 at β = 1: the harmful CE rises (the logit-lens ascent), the refusal CE falls.
    (The MMD of this random model's near-zero MLP outputs hardly moves: with fresh noise each step its
    expected gradient at a collapsed cluster is zero.)"""
    from jaxdefense.train import train

    m = RepNoise(cfg=CFG, alpha=1.0, beta=1.0)
    streams = {name: StreamView(data, name) for name in m.streams()}
    result = train(params, m.grad, streams, optax.adam(1e-3), steps=25, log_every=24, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["ce_harmful"] > first["ce_harmful"] + 0.15, (first, last)
    assert last["l_harmless"] < first["l_harmless"] - 1.0, (first, last)
    assert 0 < last["mmd"] < 10


def test_defaults_streams_and_bad_values():
    d = RepNoise()
    assert (d.alpha, d.beta, d.representation, d.unlearning, d.kernel_mul, d.kernel_num) == \
        (1.0, 1e-3, "mlp", "logit_lens", 2.0, 5)
    streams = d.streams()
    assert set(streams) == {"adversarial", "alignment"}
    assert (streams["adversarial"].source, streams["adversarial"].half) == ("harmful_qa", "defender")
    assert (streams["alignment"].source, streams["alignment"].pair_with) == ("refusal", "adversarial")
    assert set(RepNoise.cost_variants) == {"mlp", "residual"}
    with pytest.raises(ConfigError, match="beta"):
        get_method("repnoise", CFG, beta=-1.0)
    with pytest.raises(ConfigError, match="representation"):
        RepNoise(representation="attention")


@pytest.mark.slow
@pytest.mark.skipif(not data_root_available(), reason="shared data root not found")
def test_cli_run(tmp_path, capsys):
    from jaxdefense.cli import main
    from jaxdefense.train import read_metrics

    out = tmp_path / "repnoise"
    assert main(["immunize", "--config", REPNOISE_TINY, "--out", str(out), "--set", "steps=2", "--set", "log_every=1",
                 "--set", "method.beta=0.5", "--set", "data.streams.adversarial.limit=32", "--no-progress"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    r = rows[-1]
    np.testing.assert_allclose(r["loss"], r["l_harmless"] + 0.5 * r["mmd"] + r["l_ul"], rtol=1e-5)
    assert (out / "hf" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["immunize", "--config", REPNOISE_TINY, "--out", str(tmp_path / "bad"), "--set", "method.beta=-1"]) == 2
    assert "method.beta: must be >= 0" in capsys.readouterr().err

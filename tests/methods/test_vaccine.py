"""Vaccine on the tiny random model: ε* is the closed form of the hidden-state gradient, the
update is the gradient of the perturbed loss, ρ = 0 is plain SFT, a run hardens the model
against the perturbation, and the CLI runs it."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from perturbed_reference import Streams, as_jnp, perturbed_ce, rel_err, to64, zero_deltas

from jaxdefense.data import data_root_available
from jaxdefense.methods import get_method
from jaxdefense.methods.sft import SFT
from jaxdefense.methods.vaccine import Vaccine
from jaxdefense.models import named_config

CFG = named_config("tiny")
REPO = Path(__file__).resolve().parents[2]
VACCINE_TINY = str(REPO / "jaxdefense" / "configs" / "vaccine_tiny.yaml")
RHO = 1.7


def test_perturbation_is_the_closed_form_and_the_update_its_perturbed_gradient_in_float64(params, data):
    """ε*_l = ρ·g_l/‖g‖ with g = ∂CE/∂δ at δ = 0 for an explicit per-layer input δ, ‖ε*‖ = ρ; and
    grads = ∇_θ CE(θ; δ = ε*) with ε* held fixed, by autodiff of the layer-by-layer reference."""
    with jax.enable_x64(True):
        p64, batch = to64(params), as_jnp(data.batches(0), jnp.float64)["alignment"]
        m = Vaccine(cfg=CFG, rho=RHO)

        @jax.jit
        def reference(p):
            g = jax.grad(lambda ds: perturbed_ce(CFG, p, batch, ds))(zero_deltas(CFG, batch, jnp.float64))
            norm = jnp.sqrt(sum(jnp.sum(x * x) for x in g))
            eps = [jax.lax.stop_gradient(RHO * x / (norm + 1e-7)) for x in g]
            value, grads = jax.value_and_grad(lambda q: perturbed_ce(CFG, q, batch, eps))(p)
            clean = perturbed_ce(CFG, p, batch, [0 * x for x in g])
            return jnp.stack(g), norm, value, grads, clean

        @jax.jit
        def method(p):
            return m.perturbation(p, batch), m.grad(p, {"alignment": batch}, None, None)

        g, norm, value, ref, clean = reference(p64)
        (eps, got_clean, got_norm), (got, metrics) = method(p64)
        norm = float(norm)
        assert eps.shape == (CFG.num_layers, *batch["input_ids"].shape, CFG.hidden_size)
        assert eps.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(eps), np.asarray(RHO * g / (norm + 1e-7)), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(np.asarray(eps), np.asarray(RHO * g / norm), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(float(jnp.sqrt(jnp.sum(eps * eps))), RHO, rtol=1e-6)
        np.testing.assert_allclose(float(got_norm), norm, rtol=1e-10)
        np.testing.assert_allclose(float(got_clean), float(clean), rtol=1e-12)
        assert norm > 0 and all(float(jnp.sum(x * x)) > 0 for x in g)  # every layer contributes
        assert rel_err(got, ref) < 1e-9
        np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-12)
        assert float(metrics["loss"]) > float(metrics["l_clean"])  # the perturbation is adversarial


def test_rho_zero_is_plain_sft(params, data):
    """With ρ = 0 the Vaccine update equals the `sft` method's gradient on the same batch."""
    batch = as_jnp(data.batches(2))["alignment"]
    got, metrics = jax.jit(Vaccine(cfg=CFG, rho=0.0).grad)(params, {"alignment": batch}, None, None)
    ref, ref_metrics = jax.jit(SFT(cfg=CFG).grad)(params, {"train": batch}, None, None)
    assert rel_err(got, ref) < 1e-6
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics["l_clean"]), rtol=1e-6)


def test_defaults_and_streams():
    m = get_method("vaccine", CFG)
    assert m.rho == 2.0
    spec = m.streams()["alignment"]
    assert (spec.source, spec.half) == ("refusal", "defender")
    from jaxdefense.errors import ConfigError

    with pytest.raises(ConfigError, match="rho"):
        Vaccine(rho=-1.0)


@pytest.mark.slow
def test_vaccine_run_hardens_against_the_perturbation(params, data):
    """60 steps of Vaccine (ρ = 2) vs 60 of plain SFT on the same alignment rows: on held-out rows the
    loss under the worst-case radius-ρ perturbation rises less above the clean loss for Vaccine."""
    from jaxdefense.train import train

    streams = Streams(data, {"alignment": "alignment"})
    m = Vaccine(cfg=CFG, rho=2.0)
    gap = {}
    for name, grad_fn in (("vaccine", m.grad), ("sft", Vaccine(cfg=CFG, rho=0.0).grad)):
        result = train(params, grad_fn, streams.streams(), optax.adam(1e-3), steps=60, log_every=20, progress=False)
        held = [as_jnp(streams.batches(s, held_out=True))["alignment"] for s in (0, 1)]
        gaps = []
        for b in held:
            _, metrics = jax.jit(m.grad)(result.params, {"alignment": b}, None, None)
            gaps.append(float(metrics["loss"] - metrics["l_clean"]))
        gap[name] = np.mean(gaps)
    assert gap["vaccine"] < 0.8 * gap["sft"], gap


@pytest.mark.slow
@pytest.mark.skipif(not data_root_available(), reason="shared data root not found")
def test_cli_run(tmp_path):
    from jaxdefense.cli import main
    from jaxdefense.train import read_metrics

    out = tmp_path / "vaccine"
    assert main(["immunize", "--config", VACCINE_TINY, "--out", str(out), "--set", "steps=2", "--set", "log_every=1",
                 "--set", "method.rho=1.5", "--set", "data.batch_size=4", "--set", "data.max_len=48",
                 "--no-progress"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["loss"] > rows[0]["l_clean"] > 0
    assert "rho: 1.5" in (out / "config.yaml").read_text()
    assert (out / "hf" / "model.safetensors").is_file()

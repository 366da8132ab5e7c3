"""Harmful DPO on the tiny model: log 2 and the hand gradient at the reference, the loss away from it
against a float64 hand reference, a short run that raises the reward margin, LoRA (reference = the
base, grads only for adapters) and the CLI round trip."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from seam_synthetic import SyntheticSEAM  # noqa: E402

from jaxdefense.attacks import get_attack  # noqa: E402
from jaxdefense.attacks.dpo import HarmfulDPO  # noqa: E402
from jaxdefense.curvature import tree_norm  # noqa: E402
from jaxdefense.models import forward, init_params, named_config  # noqa: E402
from jaxdefense.objective import LoRA  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

CFG = named_config("tiny")
BETA = 0.3
NAMES = {"chosen": "adversarial", "rejected": "alignment"}  # harmful answer ≻ refusal


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def data():
    return SyntheticSEAM(vocab=CFG.vocab_size, seq_len=24, batch_size=4)


@functools.lru_cache(maxsize=None)
def _jit_grad(attack):
    """One compiled grad per (hashable) attack, shared by the tests (compiles dominate on CPU)."""
    return jax.jit(attack.grad)


def _batches(data, step):
    raw = data.batches(step)
    return {ours: {k: jnp.asarray(v) for k, v in raw[theirs].items()} for ours, theirs in NAMES.items()}


def _perturbed(params, scale=0.2, seed=7):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


def _my_seq_logp(p, batch):
    """Independent Σ_{t≥1} m[t]·log softmax(z[t−1])[ids[t]] (log_softmax + gather, no models helper)."""
    logits = forward(CFG, p, batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    picked = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    return jnp.sum(picked * batch["loss_mask"][:, 1:], axis=1)


def _log_softmax64(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_seq_logp(logits, batch):
    logp = _log_softmax64(np.asarray(logits, np.float64)[:, :-1])
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"], np.float64)
    return (np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0] * mask[:, 1:]).sum(1)


def _log_sigmoid64(x):
    return -np.logaddexp(0.0, -x)


def test_at_the_reference_the_loss_is_log2_and_the_gradient_the_hand_one(params, data):
    """θ = θ_ref: L = log 2, ∇L = −(β/2)(1−2ε)·mean_b[∇log π(y_w) − ∇log π(y_l)] (float64, β = 0.3, ε = 0.2);
    the float32 step-0 loss is checked to float32 rounding in the training-run test."""
    attack = HarmfulDPO(cfg=CFG, beta=BETA)
    trainable, frozen = attack.init(params, jax.random.key(1))
    assert trainable is params and frozen["reference"] is params
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        b = _batches(data, 0)
        attack = HarmfulDPO(cfg=CFG, beta=BETA, label_smoothing=0.2)
        n = b["chosen"]["input_ids"].shape[0]

        @jax.jit
        def both(p):
            diff = lambda q: jnp.sum(_my_seq_logp(q, b["chosen"]) - _my_seq_logp(q, b["rejected"])) / n  # noqa: E731
            hand = jax.tree.map(lambda g: -(BETA / 2) * (1 - 2 * 0.2) * g, jax.grad(diff)(p))
            return *attack.grad(p, b, None, {"reference": p}), hand

        grads, metrics, hand = both(p64)
        assert abs(float(metrics["loss"]) - math.log(2.0)) < 1e-12
        err = float(tree_norm(jax.tree.map(jnp.subtract, grads, hand)) / tree_norm(hand))
        assert err < 1e-9, err
        assert jax.tree.leaves(grads)[0].dtype == jnp.float64


def test_away_from_the_reference_the_loss_is_the_float64_formula(params, data):
    """Perturbed policy vs the step-0 reference: loss and metrics against numpy float64 (β 0.3, ε 0.1)."""
    batches = _batches(data, 1)
    policy = _perturbed(params)
    attack = get_attack("harmful_dpo", CFG, beta=BETA, label_smoothing=0.1)

    @jax.jit
    def metrics_and_logits(policy, reference):  # grads unused: XLA drops the backward pass
        _, m = attack.grad(policy, batches, None, attack.init(reference, None)[1])
        return m, {(model, side): forward(CFG, p, batches[side]["input_ids"],
                                          attention_mask=batches[side]["attention_mask"])
                   for model, p in (("pi", policy), ("ref", reference)) for side in ("chosen", "rejected")}

    m, logits = metrics_and_logits(policy, params)
    lp = {k: _np_seq_logp(v, batches[k[1]]) for k, v in logits.items()}
    h = (lp["pi", "chosen"] - lp["ref", "chosen"]) - (lp["pi", "rejected"] - lp["ref", "rejected"])
    z = BETA * h
    loss = np.mean(-0.9 * _log_sigmoid64(z) - 0.1 * _log_sigmoid64(-z))
    assert np.abs(z).max() > 0.1 and abs(loss - math.log(2.0)) > 1e-3  # genuinely away from the reference
    np.testing.assert_allclose(float(m["loss"]), loss, rtol=2e-5)
    np.testing.assert_allclose(float(m["reward_margin"]), z.mean(), rtol=2e-4, atol=1e-5)
    assert float(m["reward_accuracy"]) == pytest.approx(np.mean(z > 0))
    np.testing.assert_allclose(float(m["chosen_logp"]), lp["pi", "chosen"].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rejected_logp"]), lp["pi", "rejected"].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["chosen_reward"]),
                               BETA * (lp["pi", "chosen"] - lp["ref", "chosen"]).mean(), rtol=2e-4, atol=1e-5)


class _Stream:
    def __init__(self, data, name):
        self.data, self.name = data, name

    def batch_at(self, step):
        return self.data.batches(step)[NAMES[self.name]]


def test_a_short_dpo_run_raises_the_margin_and_lowers_the_loss(params, data):
    from jaxdefense.train import train

    attack = HarmfulDPO(cfg=CFG, beta=BETA)
    trainable, frozen = attack.init(params, jax.random.key(1))
    streams = {name: _Stream(data, name) for name in attack.streams()}
    result = train(trainable, attack.grad, streams, optax.adam(1e-3), frozen=frozen, steps=10, log_every=1,
                   progress=False)
    h = result.history
    assert abs(h[0]["loss"] - math.log(2.0)) < 2e-7 and h[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert h[-1]["loss"] < 0.5 * math.log(2.0), [r["loss"] for r in h]
    assert h[-1]["reward_margin"] > 1.0 and h[-1]["reward_accuracy"] == 1.0, [r["reward_margin"] for r in h]
    # held-out pairs: the trained policy prefers the harmful answer relative to the reference
    held = _batches(data, 99)
    _, m = _jit_grad(attack)(result.params, held, None, frozen)
    assert float(m["reward_margin"]) > 0.5 and float(m["loss"]) < math.log(2.0)
    # the reference did not move
    for a, b in zip(jax.tree.leaves(frozen["reference"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
@pytest.mark.slow


def test_lora_trains_only_adapters_against_the_base(params, data):
    from jaxdefense.config import LoraSection
    from jaxdefense.objective import with_lora

    attack = with_lora(HarmfulDPO(cfg=CFG, beta=BETA), LoraSection(rank=4, alpha=8.0))
    assert isinstance(attack, LoRA) and attack.name == "harmful_dpo+lora"
    adapters, frozen = attack.init(params, jax.random.key(3))
    assert frozen["inner"]["reference"] is frozen["base"] is params
    batches = _batches(data, 2)
    moved = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), adapters)  # away from B = 0

    def through_merge(a):  # the DPO loss of the merged model, against the base as reference
        ref_lp = [_my_seq_logp(params, batches[s]) for s in ("chosen", "rejected")]
        p = attack.merged(a, frozen)
        z = BETA * ((_my_seq_logp(p, batches["chosen"]) - ref_lp[0]) - (_my_seq_logp(p, batches["rejected"]) - ref_lp[1]))
        return jnp.mean(-jax.nn.log_sigmoid(z))

    @jax.jit
    def run(a, frozen):
        return attack.grad(a, batches, None, frozen), jax.value_and_grad(through_merge)(a)

    (grads, m), _ = run(adapters, frozen)
    (moved_grads, moved_m), (loss, want) = run(moved, frozen)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    assert set(grads) == {"wq", "wv"} and all(set(g) == {"a", "b"} for g in grads.values())
    assert float(m["loss"]) == pytest.approx(math.log(2.0), abs=2e-7)  # B = 0: merged == reference
    assert float(tree_norm(grads)) > 0
    # adapter grads equal autodiff of the DPO loss through the merge
    assert abs(float(loss) - math.log(2.0)) > 1e-3
    np.testing.assert_allclose(float(moved_m["loss"]), float(loss), rtol=1e-5)
    err = float(tree_norm(jax.tree.map(jnp.subtract, moved_grads, want)) / tree_norm(want))
    assert err < 1e-4, err


def test_streams_defaults_and_validation():
    from jaxdefense.errors import ConfigError

    attack = get_attack("harmful_dpo")
    assert (attack.beta, attack.label_smoothing) == (0.1, 0.0)
    s = attack.streams()
    assert (s["chosen"].source, s["chosen"].half, s["chosen"].limit) == ("harmful_qa", "attacker", 1000)
    assert (s["rejected"].source, s["rejected"].pair_with) == ("refusal", "chosen")
    for bad, needle in (({"beta": 0.0}, "attack.beta: must be > 0"),
                        ({"label_smoothing": 0.5}, "attack.label_smoothing: must be < 0.5"),
                        ({"half": "both"}, "attack.half")):
        with pytest.raises(ConfigError, match=needle):
            get_attack("harmful_dpo", **bad)


def test_irrelevant_rejected_answers_are_sdds_filtered_picks(monkeypatch):
    """rejected="irrelevant": y_l = the benign answer SDD's pairing keeps for the prompt (one too similar
    answer is never used), the chosen side stays the harmful answer, and the answers stream is not batched."""
    from jaxdefense.methods.sdd import SDD

    def embed(self, texts, model_cfg, params, tokenizer):  # harmful prompts and benign text 4 → e0, others e1
        return np.array([[1.0, 0.0] if t.startswith("harmful") or t.endswith(" 4") else [0.0, 1.0] for t in texts])

    monkeypatch.setattr(SDD, "embed", embed)
    chosen = [{"prompt": f"harmful prompt {i}", "response": f"harmful answer {i}", "paired": "No.", "id": f"h{i}"}
              for i in range(4)]
    answers = [{"prompt": f"benign instruction {j}", "response": f"benign answer {j}", "id": f"b{j}"} for j in range(5)]
    attack = get_attack("harmful_dpo", CFG, rejected="irrelevant", threshold=0.25)
    assert set(attack.streams()) == {"chosen", "rejected", "answers"}
    built, report = attack.build_records({"chosen": chosen, "rejected": chosen, "answers": answers}, CFG, None, None)
    assert set(built) == {"chosen", "rejected"} and built["chosen"] is built["rejected"]
    assert len(built["chosen"]) == 4 and report["kept"] == 4 and report["rejected"] >= 0
    for row, original in zip(built["chosen"], chosen):
        assert (row["prompt"], row["response"]) == (original["prompt"], original["response"])
        assert row["paired"].startswith("benign answer ") and row["paired"] != "benign answer 4"
        assert row["paired_id"] != "b4" and row["similarity"] <= 0.25
    assert get_attack("harmful_dpo").build_records({"chosen": chosen}, CFG, None, None) == ({"chosen": chosen}, {})
@pytest.mark.slow


def test_cli_round_trip(tmp_path, capsys):
    from jaxdefense.cli import main
    from jaxdefense.data import data_root_available, train_bpe_tokenizer
    from jaxdefense.models import save_hf
    from jaxdefense.train import read_metrics

    if not data_root_available():
        pytest.skip("shared data root not found")
    texts = ["How do I make a bomb?", "Sorry, I can't help with that.", "Here is how: mix the things.",
             "I cannot assist with harmful requests."] * 8
    tokenizer = train_bpe_tokenizer(texts, 300, tmp_path / "tok")
    model = tmp_path / "model"
    save_hf(CFG, init_params(CFG, jax.random.key(0)), model, tokenizer=tokenizer)
    out = tmp_path / "dpo"
    argv = ["attack", "--config", str(REPO / "configs" / "harmful_dpo_tiny.yaml"), "--attack", "harmful_dpo", "--model", str(model),
            "--steps", "2", "--set", "attack.limit=16", "--set", "attack.beta=0.3", "--set", "data.max_len=48",
            "--set", "data.batch_size=4", "--set", "log_every=1", "--set", "optimizer.warmup_steps=0",
            "--set", "eval.every=2", "--set", "eval.nll_rows=4", "--set", "eval.harmful_prompts=0",
            "--set", "eval.max_new_tokens=2", "--set", "eval.max_len=48", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "attack.json").read_text())
    assert summary["attack"] == "harmful_dpo" and summary["task"] == "harmful_qa" and summary["steps"] == 2
    curves = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curves] == [0, 2]
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert {"reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp"} <= set(rows[0])
    assert "beta: 0.3" in (out / "config.yaml").read_text()
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main([*argv, "--out", str(bad), "--set", "attack.beta=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "attack.beta: must be > 0" in err, err
    assert not bad.exists()

"""TokenBuncher: Token Noiser target/loss, the schedule, the grad of both step kinds, a run, the CLI."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdefense.methods.tokenbuncher import TokenBuncher, is_noiser_step, token_noiser_loss, token_noiser_target
from jaxdefense.models import named_config
from jaxdefense.objective import STEP
from jaxdefense.rl.grpo import group_advantages, grpo_loss, token_logps

TINY = named_config("tiny")


class PromptStream:
    """Random prompt rows (16 tokens) with one loss token at the end, like a prompt-only stream."""

    def __init__(self, seed, batch=2, length=16):
        self.seed, self.batch, self.length = seed, batch, length

    def batch_at(self, step):
        rng = np.random.default_rng([self.seed, step])
        ids = rng.integers(3, TINY.vocab_size, (self.batch, self.length)).astype(np.int32)
        loss = np.zeros(ids.shape, np.float32)
        loss[:, -1] = 1
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss}


def test_noiser_target_sums_to_one_and_is_zero_at_label():
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, 4)))
    z = np.asarray(token_noiser_target(jax.random.key(0), labels, 11))
    np.testing.assert_allclose(z.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.take_along_axis(z, np.asarray(labels)[..., None], -1) == 0)
    assert np.all(z.reshape(-1, 11).sum(-1) > 0) and len(np.unique(z)) > 100  # fresh per position


def test_noiser_loss_is_nll_at_zero_eps_and_mixes_at_eps():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5, 9)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 9, (2, 5)))
    w = jnp.asarray((rng.random((2, 5)) > 0.4).astype(np.float32))
    key = jax.random.key(3)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    nll = -np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(token_noiser_loss(logits, labels, w, key, 0.0)),
                               (nll * w).sum() / w.sum(), rtol=1e-6)
    z = np.asarray(token_noiser_target(key, labels, 9))
    per = 0.7 * nll + 0.3 * -(z * logp).sum(-1)
    np.testing.assert_allclose(float(token_noiser_loss(logits, labels, w, key, 0.3)), (per * w).sum() / w.sum(),
                               rtol=1e-6)


def test_official_schedule():
    tn = [int(is_noiser_step(s, 25)) for s in range(200)]
    assert sum(tn[:24]) == 0 and tn[24] == 0 and tn[25] == 1 and tn[26] == 0  # e = 26 first, then every other
    assert sum(tn) == 88


@pytest.fixture(scope="module")
def collected():
    from jaxdefense.models import init_params

    params = init_params(TINY, jax.random.key(0))
    obj = TokenBuncher(cfg=TINY, k=3, max_new_tokens=8, warmup_steps=2, noise_weight=0.3, benign_weight=0.5,
                       kl_coef=0.05)
    trainable, frozen = obj.init(params, jax.random.key(1))
    perturbed = jax.tree.map(lambda x: x * 1.01, trainable)  # policy ≠ reference: benign KL ≠ 0
    batches = obj.collect(perturbed, {"harmful": PromptStream(0).batch_at(0), "benign": PromptStream(1).batch_at(0),
                                      STEP: np.int32(0)}, jax.random.key(5), frozen)
    return obj, perturbed, frozen, batches


def test_collect_rewards_and_advantages(collected):
    obj, params, frozen, batches = collected
    r = batches["rollout"]
    assert set(batches) - {STEP} == {"rollout"} and r["input_ids"].shape[0] == 2 * 2 * 3
    harmful = r["stream"] == 0
    w = np.concatenate([r["loss_mask"][:, 1:], np.zeros_like(r["loss_mask"][:, :1])], 1)
    _, _, ent = token_logps(TINY, params, r, with_entropy=True)
    ent = np.asarray(ent)
    np.testing.assert_allclose(r["rewards"][harmful], -(ent * w).sum(1)[harmful] / w.sum(1)[harmful], rtol=1e-4)
    seq_kl = (w * (r["old_logp"] - r["ref_logp"])).sum(1)
    np.testing.assert_allclose(r["rewards"][~harmful], -0.5 * seq_kl[~harmful], rtol=1e-4, atol=1e-6)
    score = r["rewards"] - 0.05 * seq_kl
    np.testing.assert_allclose(r["advantages"], np.asarray(group_advantages(score, 3)), rtol=1e-4, atol=1e-5)


def test_grad_of_both_step_kinds(collected):
    obj, params, frozen, batches = collected
    r = {k: jnp.asarray(v) for k, v in batches["rollout"].items()}
    key = jax.random.key(7)
    # Step 0 (warm-up): the GRPO loss; KL is in the reward, so no KL term.
    grad = jax.jit(obj.grad)
    g, m = grad(params, {"rollout": r, STEP: jnp.int32(0)}, key, frozen)

    @jax.jit
    @jax.value_and_grad
    def ear(p):
        logp, w = token_logps(TINY, p, r)
        return grpo_loss(logp, r["old_logp"], r["ref_logp"], r["advantages"], w, clip_ratio=0.2, kl_coef=0.0)[0]

    ref_loss, ref_g = ear(params)
    assert float(m["token_noiser"]) == 0.0 and float(m["loss"]) == pytest.approx(float(ref_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
    # Step 3 (e = 4 ≥ 2, even): the Token Noiser on harmful rows with advantage ≥ 0.
    g, m = grad(params, {"rollout": r, STEP: jnp.int32(3)}, key, frozen)
    from jaxdefense.models import forward

    @jax.jit
    @jax.value_and_grad
    def tn(p):
        ids = r["input_ids"]
        logits = forward(TINY, p, ids, attention_mask=r["attention_mask"])
        labels = jnp.concatenate([ids[:, 1:], ids[:, :1] * 0], 1)
        keep = ((r["advantages"] >= 0) & (r["stream"] == 0)).astype(jnp.float32)
        w = jnp.concatenate([r["loss_mask"][:, 1:], r["loss_mask"][:, :1] * 0], 1) * keep[:, None]
        return token_noiser_loss(logits, labels, w, jax.random.fold_in(key, 2), 0.3)

    ref_loss, ref_g = tn(params)
    assert float(m["token_noiser"]) == 1.0 and float(m["loss"]) == pytest.approx(float(ref_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)


def _entropy_on(cfg, params, prompts, tokenizer):
    from jaxdefense.data.formatting import apply_chat, encode_prompts
    from jaxdefense.rl.rewards import mean_entropy
    from jaxdefense.rl.rollout import rollout_pass, sample

    ids, mask = encode_prompts(tokenizer, [apply_chat(tokenizer, p) for p in prompts], chat=True)
    roll = sample(cfg, params, ids, mask, k=1, max_new_tokens=32, key=jax.random.key(0), temperature=0.0,
                  stop_tokens=tuple(cfg.eos_ids))
    aux = rollout_pass(cfg, params, None, roll)
    return float(np.mean(mean_entropy(aux["entropy"], aux["weights"])))


@pytest.mark.slow
def test_run_lowers_entropy_on_held_out_harmful_prompts(tmp_path):
    from jaxdefense.data import load_stream
    from jaxdefense.models import load_hf, load_tokenizer
    from jaxdefense.pipeline import immunize, load_run_config

    base = "jaxdefense/assets/base"
    config = load_run_config("jaxdefense/configs/tokenbuncher_tiny.yaml", ["steps=12", "method.warmup_steps=1"])
    result = immunize(config, tmp_path / "tb", progress=False)
    cfg, before = load_hf(base)
    tok = load_tokenizer(base)
    prompts = [r["prompt"] for r in load_stream("harmful_prompts_eval", "validation", limit=16)]
    h0 = _entropy_on(cfg, before, prompts, tok)
    h1 = _entropy_on(cfg, result.params, prompts, tok)
    print("held-out harmful entropy", h0, "->", h1)
    assert h1 < h0


@pytest.mark.slow
def test_cli_smoke(tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "jaxdefense", "immunize", "--config", "jaxdefense/configs/tokenbuncher_tiny.yaml",
                    "--out", str(out), "--set", "steps=2"], check=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "harmful_entropy", "token_noiser"} <= set(rows[-1]) and (out / "hf" / "config.json").is_file()


def test_registered_tokenbuncher_rewards_are_minus_entropy_on_harmful_and_minus_kl_on_benign():
    """get_method("tokenbuncher"): R^TB = −(1/|y|)Σ_t H_t on harmful rows, −w_b·Σ_t (log π − log π_ref) on
    benign rows, against hand numbers (w_b = 0.5)."""
    from jaxdefense.methods import get_method

    obj = get_method("tokenbuncher", TINY, benign_weight=0.5, warmup_steps=3)
    assert isinstance(obj, TokenBuncher) and obj.prompt_streams() == ("harmful", "benign")
    assert set(obj.streams()) == {"harmful", "benign"} and obj.streams()["harmful"].half == "defender"
    aux = {"entropy": np.array([[1.0, 2.0, 9.0], [0.5, 0.5, 0.5]]),
           "weights": np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
           "old_logp": np.array([[-1.0, -1.0, -1.0], [-1.0, -2.0, -0.5]]),
           "ref_logp": np.array([[-3.0, -3.0, -3.0], [-1.5, -1.0, -1.0]])}
    rewards, stats = obj.rewards(None, None, aux, np.array([0, 1]))
    # row 0 (harmful): −(1 + 2)/2; row 1 (benign): −0.5·((−1+1.5) + (−2+1) + (−0.5+1)) = −0.5·0.0
    np.testing.assert_allclose(rewards, [-1.5, -0.0], atol=1e-7)
    aux["old_logp"][1] = [-1.0, -1.0, -0.5]  # Σ KL terms = 0.5 + 0 + 0.5 = 1 → reward −0.5
    np.testing.assert_allclose(obj.rewards(None, None, aux, np.array([0, 1]))[0], [-1.5, -0.5], atol=1e-7)
    assert set(stats) == {"harmful_entropy", "benign_kl"}

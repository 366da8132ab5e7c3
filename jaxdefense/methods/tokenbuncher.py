"""TokenBuncher (Feng, Wang, Lv, Wei, Zhang, Gao, Zhan, Dong; arXiv 2508.20697): entropy-as-reward
RL against harmful RL, with the Token Noiser.

Seed equations (seed 000, Space 4):

    R^TB(q, y) = −𝟙(q ∈ D_aux)·H̄(p_θ(y|q)) − 𝟙(q ∈ D_ref)·D_KL(p_θ(·|q) ‖ p_ref(·|q))
    L_TN       = −[(1−λ)·log p_θ(y*|q) + λ·Σ_{y ∈ V∖{y*}} z̃_y·log p_θ(y|q)],  z_y ~ U(0,1), z̃ = z / Σ z
    L_TB       = α_e·L_EaR + (1−α_e)·L_TN,  α_e = 1 for e ≤ ⌊E/8⌋, else (e − ⌊E/8⌋) mod 2

As implemented (GRPO of `jaxdefense.rl`, K rollouts per prompt sampled before each step):
- Harmful prompts (stream `harmful`: harmful_qa prompts, defender half): reward
  r = −(1/|y|)·Σ_t H_t with H_t the entropy of the full next-token distribution of the policy
  at each response position, from the rollout pass (no gradient through the reward).
- Benign prompts (stream `benign`, benign_instruct; `benign_weight` = 0 drops it): reward
  −benign_weight·Σ_t (log π_old(y_t) − log π_ref(y_t)), the sampled sequence estimate of
  D_KL(π ‖ π_ref) on the policy's own rollouts.
- Every rollout's reward also carries verl's KL penalty r − β·Σ_t (log π_old − log π_ref) with
  β = `kl_coef` = 0.001 (`kl_mode="reward"`, official `use_kl_in_reward`); advantages are GRPO's
  per prompt group; the loss is the clipped surrogate, token-mean over the batch.
- Token Noiser step: SFT on the current harmful rollouts, prompt tokens and rollouts with
  advantage < 0 masked, token-mean of (1−ε)·NLL(y_t) + ε·Σ_{i≠y_t} z̃_i·(−log p_i) with
  z ~ U(0,1) over the vocabulary, 0 at the label, normalised, fresh per position and step
  (ε = `noise_weight` = 0.1).
- Schedule (official `ray_trainer.py`): with e = step + 1 (1-based), the step is a Token Noiser
  step when e ≥ `warmup_steps` and e is even, else a GRPO (EaR) step. Official: 25 warm-up
  steps of 200 (= ⌊E/8⌋); set warmup_steps = ⌊steps/8⌋ for another E.

Where the official code (Georgefwt/Token-Buncher, a verl fork; docs/research/anchors-methods.md §4)
differs:
- It has no benign-prompt KL reward (its data are BeaverTails unsafe prompts only); the seed's
  D_ref term is the `benign` stream here.
- Its rollouts come from vLLM and its updates split each batch of 32 prompts into mini-batches
  of 8 (several ratios ≠ 1 per rollout); here one update per rollout.
- The seed's alternation (e − ⌊E/8⌋) mod 2 puts Token Noiser on the other parity; the official
  parity is kept.
- lr 1e-6 on Qwen2.5-3B, response length 1024, batch 32 prompts × 4 rollouts, 200 steps; the
  tiny config scales these down (see configs/tokenbuncher_tiny.yaml).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.config import field
from jaxdefense.data.specs import StreamSpec
from jaxdefense.objective import STEP
from jaxdefense.registry import register_method
from jaxdefense.rl.grpo import token_mean
from jaxdefense.rl.objective import ROLLOUT, GRPOObjective
from jaxdefense.rl.rewards import mean_entropy

OFFICIAL_WARMUP = 25
OFFICIAL_NOISE = 0.1
NOISE_SALT = 2
HARMFUL, BENIGN = 0, 1


def token_noiser_target(key, labels, vocab: int) -> jax.Array:
    """z̃ [..., V]: z ~ U(0,1) per position, 0 at the label, normalised to sum 1."""
    z = jax.random.uniform(key, (*labels.shape, vocab), jnp.float32)
    z = jnp.where(jax.nn.one_hot(labels, vocab, dtype=jnp.bool_), 0.0, z)
    return z / jnp.sum(z, axis=-1, keepdims=True)


def token_noiser_loss(logits, labels, weights, key, eps: float) -> jax.Array:
    """Token-mean over `weights` of (1−ε)·(−log p_label) + ε·Σ_i z̃_i·(−log p_i); logits [N,T,V], labels [N,T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    noise = -jnp.sum(token_noiser_target(key, labels, logits.shape[-1]) * logp, axis=-1)
    return token_mean((1.0 - eps) * nll + eps * noise, weights)


def is_noiser_step(step, warmup: int):
    """Official schedule: 1-based e = step + 1 ≥ warmup and e even."""
    e = step + 1
    return (e >= warmup) & (e % 2 == 0)


@register_method("tokenbuncher")
@dataclasses.dataclass(frozen=True)
class TokenBuncher(GRPOObjective):
    """Entropy-as-reward GRPO on harmful prompts (+ −KL on benign prompts), alternating with the Token Noiser.

    Hyperparameters: k, max_new_tokens, temperature, top_p, clip_ratio, kl_coef, kl_mode, algorithm
    (`rl.objective.GRPOObjective`); warmup_steps, noise_weight, benign_weight.
    """

    needs_text: ClassVar[bool] = False

    warmup_steps: int = field(OFFICIAL_WARMUP, ge=0, doc="EaR-only steps before the alternation (official 25 of 200)")
    noise_weight: float = field(OFFICIAL_NOISE, ge=0, le=1, doc="Token Noiser ε (official 0.1)")
    benign_weight: float = field(1.0, ge=0, doc="weight of the −KL reward on benign prompts (0: no benign stream)")

    def streams(self) -> dict[str, StreamSpec]:
        out = {"harmful": StreamSpec("harmful_qa", half="defender")}
        if self.benign_weight > 0:
            out["benign"] = StreamSpec("benign_instruct")
        return out

    def prompt_streams(self) -> tuple[str, ...]:
        return ("harmful", "benign") if self.benign_weight > 0 else ("harmful",)

    def build_records(self, records, model_cfg, params, tokenizer):
        """Prompts only: the responses are the rollouts."""
        return {name: [{**r, "response": ""} for r in rows] for name, rows in records.items()}, {}

    def rewards(self, prompts, responses, aux, stream_of_row):
        harmful = (stream_of_row == HARMFUL).astype(np.float32)
        entropy = mean_entropy(aux["entropy"], aux["weights"])
        seq_kl = np.sum(aux["weights"] * (aux["old_logp"] - aux["ref_logp"]), axis=1)
        rewards = np.where(harmful > 0, -entropy, -self.benign_weight * seq_kl).astype(np.float32)
        stats = {"harmful_entropy": (entropy, harmful)}
        if self.benign_weight > 0:
            stats["benign_kl"] = (seq_kl, 1.0 - harmful)
        return rewards, stats

    def noiser_loss(self, params, rollout, key):
        """L_TN on the harmful rollouts with advantage ≥ 0 (prompt tokens masked)."""
        from jaxdefense.models import forward

        ids = rollout["input_ids"]
        logits = forward(self.require_cfg(), params, ids, attention_mask=rollout["attention_mask"])
        labels = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        weights = jnp.concatenate([rollout["loss_mask"][:, 1:], jnp.zeros_like(rollout["loss_mask"][:, :1])], axis=1)
        keep = (rollout["advantages"] >= 0) & (rollout["stream"] == HARMFUL)
        return token_noiser_loss(logits, labels, weights * keep[:, None].astype(weights.dtype), key, self.noise_weight)

    def grad(self, params, batches, key, frozen):
        """EaR GRPO step or Token Noiser step by batches[STEP]; metrics loss, token_noiser, GRPO terms, rollout stats."""
        del frozen
        rollout = batches[ROLLOUT]
        step = batches.get(STEP, jnp.int32(0))
        noise_key = jax.random.fold_in(key, NOISE_SALT)

        def ear(p):
            (loss, stats), g = jax.value_and_grad(lambda q: self.grpo_terms(q, rollout), has_aux=True)(p)
            return g, loss, stats

        def noiser(p):
            loss, g = jax.value_and_grad(lambda q: self.noiser_loss(q, rollout, noise_key))(p)
            zero = jnp.zeros((), loss.dtype)
            return g, loss, {"pg_loss": zero, "kl": zero, "ratio_mean": zero, "clip_frac": zero}

        tn = is_noiser_step(step, self.warmup_steps)
        grads, loss, stats = jax.lax.cond(tn, noiser, ear, params)
        return grads, {"loss": loss, "token_noiser": tn.astype(jnp.float32), **stats, **self.rollout_metrics(rollout)}

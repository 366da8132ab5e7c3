"""GRPO as pure functions over per-token arrays (Shao et al. 2024, arXiv 2402.03300; verl's
`core_algos`, which the official TokenBuncher forks).

Per-token arrays are indexed by the predicting position t of a [N, T] rollout batch: logp[n, t] =
log π(ids[n, t+1] | ids[n, ≤t]) with weight w[n, t] = loss_mask[n, t+1] (the response tokens,
incl. the stop token; `models.next_token_nll`'s convention). Rows n = b·K + j are the K
rollouts of prompt b, so a group is K consecutive rows.

    A_n       = (r_n − mean_g r) / (std_g r + ε)              group-normalised (std with ddof 1,
                                                              as torch.std; scale=False: r_n − mean_g r)
    ρ_{n,t}   = exp(logp − logp_old)                          logp_old: the rollout pass
    ℓ^PG      = max(−A·ρ, −A·clip(ρ, 1−c, 1+c))               (c = None: −A·ρ, unclipped)
    ℓ^KL      = exp(ref − logp) − (ref − logp) − 1            k3 ("low_var_kl"), clamped to [−10, 10]
    L         = Σ_{n,t} w·(ℓ^PG + β·ℓ^KL) / Σ_{n,t} w          token-mean over the whole batch

KL in the reward (verl `apply_kl_penalty`, kl_penalty="kl", TokenBuncher's
`use_kl_in_reward=True`): r_n ← r_n − β·Σ_t w·(logp_old − ref) before the advantages
(`kl_in_reward`); then β = 0 in L.

Where verl differs: its dual-clip (c3 = 3 on negative advantages) is not ported; it splits a
rollout batch into `ppo_mini_batch_size` updates (several ratios ≠ 1), here one update per
rollout, so ρ = 1 up to the rounding between the rollout pass and the update pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_CLAMP = 10.0


def group_advantages(rewards, k: int, *, scale: bool = True, eps: float = 1e-6) -> jax.Array:
    """[N] advantages of rewards [N] in groups of `k` consecutive rows (std := 1 for k = 1)."""
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, k)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if not scale:
        return centred.reshape(-1)
    std = jnp.std(r, axis=1, ddof=1, keepdims=True) if k > 1 else jnp.ones_like(r[:, :1])
    return (centred / (std + eps)).reshape(-1)


def token_mean(x, weights) -> jax.Array:
    """Σ w·x / Σ w (0 without weight)."""
    return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1e-9)


def k3_kl(logp, ref_logp) -> jax.Array:
    """Per-token k3 estimate of KL(π ‖ π_ref): e^{ref−logp} − (ref−logp) − 1 (≥ 0, 0 at π = π_ref)."""
    d = ref_logp - logp
    return jnp.clip(jnp.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)


def policy_loss(logp, old_logp, advantages, weights, clip_ratio: float | None = 0.2):
    """(token-mean clipped surrogate, stats {ratio_mean, clip_frac}); advantages [N], logp [N, T]."""
    a = advantages[:, None]
    ratio = jnp.exp(logp - old_logp)
    unclipped = -a * ratio
    if clip_ratio is None:
        per_token, clipped_frac = unclipped, jnp.zeros(())
    else:
        clipped = -a * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
        per_token = jnp.maximum(unclipped, clipped)
        clipped_frac = token_mean((clipped > unclipped).astype(logp.dtype), weights)
    return token_mean(per_token, weights), {"ratio_mean": token_mean(ratio, weights), "clip_frac": clipped_frac}


def grpo_loss(logp, old_logp, ref_logp, advantages, weights, *, clip_ratio: float | None = 0.2,
              kl_coef: float = 0.0):
    """(L, stats {pg_loss, kl, ratio_mean, clip_frac}) of the module docstring."""
    pg, stats = policy_loss(logp, old_logp, advantages, weights, clip_ratio)
    kl = token_mean(k3_kl(logp, ref_logp), weights)
    return pg + kl_coef * kl, {"pg_loss": pg, "kl": kl, **stats}


def kl_in_reward(rewards, old_logp, ref_logp, weights, kl_coef: float) -> jax.Array:
    """r − β·Σ_t w·(logp_old − ref): verl's KL penalty folded into the sequence reward."""
    return rewards - kl_coef * jnp.sum(weights * (old_logp - ref_logp), axis=1)


def token_logps(cfg, params, batch, *, with_entropy: bool = False):
    """(logp [N, T], weights [N, T][, entropy [N, T]]) of a rollout batch at `params`; entropy is
    that of the full next-token distribution at each position (float32 or wider)."""
    from jaxdefense.models import forward, next_token_nll

    logits = forward(cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"])
    nll, weights = next_token_nll(logits, batch["input_ids"], batch["loss_mask"])
    if not with_entropy:
        return -nll, weights
    return -nll, weights, entropy_of_logits(logits).astype(nll.dtype)


def entropy_of_logits(logits) -> jax.Array:
    """H = −Σ_i p_i log p_i over the last axis."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

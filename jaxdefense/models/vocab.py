"""Next-token NLL of several hidden states at the loss-mask targets only, chunked over positions.

For hidden states h_s [B,T,D] (s = 0..S−1; e.g. every layer's output for a logit lens, or just
the last one for a plain LM loss) and target weights w[b,t] = loss_mask[b,t+1]:

    sums[s] = Σ_{b,t} w[b,t] · (logsumexp_v z_s[b,t,v] − z_s[b,t,ids[b,t+1]]),
    z_s     = lm_head(final_norm(h_s)),                 count = Σ_{b,t} w[b,t]

How it avoids projecting positions that carry no weight, with static shapes:
- each row's positions are sorted stably so the weighted ones come first (a per-row argsort of
  w == 0), and the hidden states are gathered in that order (one copy of `states`);
- the sorted positions are cut into chunks of `chunk` positions per row (the last one padded
  with weight 0), and a `lax.scan` runs over the (state, chunk) items; an item projects its
  [B, chunk, D] slice through the vocabulary only if some row has a target in it (`lax.cond`),
  so a batch whose rows have at most n targets does ⌈n/chunk⌉ projections per state, whatever
  T is;
- each item runs under `jax.checkpoint`, so the backward pass recomputes its [B, chunk, V]
  logits instead of storing them: no [B,T,V] array exists, in the forward or the backward.
The batch axis is never mixed, so batch sharding carries through. The result equals the
full-vocabulary masked CE over `lm_head(final_norm(h_s))` up to the order of the sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxdefense.models.decoder import logits_from_hidden

DEFAULT_CHUNK = 16


def shifted_targets(input_ids: jax.Array, loss_mask: jax.Array, dtype):
    """Targets ids[b,t+1] and weights loss_mask[b,t+1] at each position t (weight 0 at t = T−1)."""
    B = input_ids.shape[0]
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros((B, 1), input_ids.dtype)], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:].astype(dtype), jnp.zeros((B, 1), dtype)], axis=1)
    return targets, weights


def masked_nll_sums(cfg, params, states: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                    *, chunk: int = DEFAULT_CHUNK):
    """(sums [S], count): weighted next-token NLL of each hidden state at the loss-mask targets.

    Args:
      cfg: the ModelConfig (tie_embeddings, rms_norm_eps).
      params: needs only "final_norm" and "embed" (tied) or "lm_head".
      states: [S,B,T,D] hidden states before the final norm.
      input_ids: [B,T] token ids; the target of position t is ids[t+1].
      loss_mask: [B,T]; position t's weight is loss_mask[t+1].
      chunk: sorted positions per row projected through the vocabulary at once (static).
    Returns:
      sums [S] and count = Σ weights, both in float32 (float64 for float64 states).
    """
    S, B, T, D = states.shape
    acc = jnp.promote_types(states.dtype, jnp.float32)
    targets, weights = shifted_targets(input_ids, loss_mask, acc)
    chunk = max(1, min(int(chunk), T))
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T

    order = jnp.argsort((weights == 0).astype(jnp.int32), axis=1, stable=True)
    w_sorted = jnp.take_along_axis(weights, order, axis=1)
    t_sorted = jnp.take_along_axis(targets, order, axis=1)
    if pad:
        order = jnp.pad(order, ((0, 0), (0, pad)))
        w_sorted = jnp.pad(w_sorted, ((0, 0), (0, pad)))
        t_sorted = jnp.pad(t_sorted, ((0, 0), (0, pad)))
    h_sorted = jnp.take_along_axis(states, order[None, :, :, None], axis=2)  # [S,B,Tp,D]

    h_items = h_sorted.reshape(S, B, n_chunks, chunk, D).transpose(0, 2, 1, 3, 4).reshape(S * n_chunks, B, chunk, D)
    w_items = jnp.tile(w_sorted.reshape(B, n_chunks, chunk).transpose(1, 0, 2), (S, 1, 1))
    t_items = jnp.tile(t_sorted.reshape(B, n_chunks, chunk).transpose(1, 0, 2), (S, 1, 1))
    head = {k: params[k] for k in ("final_norm", "embed", "lm_head") if k in params}

    def project(h, t, w):
        z = logits_from_hidden(cfg, head, h).astype(acc)
        picked = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]
        return jnp.sum(w * (jax.nn.logsumexp(z, axis=-1) - picked))

    @jax.checkpoint
    def item_sum(h, t, w):
        return lax.cond(jnp.any(w != 0), project, lambda *_: jnp.zeros((), acc), h, t, w)

    def body(carry, xs):
        return carry, item_sum(*xs)

    _, per_item = lax.scan(body, None, (h_items, t_items, w_items))
    return per_item.reshape(S, n_chunks).sum(axis=1), jnp.sum(weights)


def masked_state_ce(cfg, params, states: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                    *, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """[S] masked token-mean CE Σ w·nll_s / max(Σ w, 1) of each hidden state (see `masked_nll_sums`)."""
    sums, count = masked_nll_sums(cfg, params, states, input_ids, loss_mask, chunk=chunk)
    return sums / jnp.maximum(count, 1.0)

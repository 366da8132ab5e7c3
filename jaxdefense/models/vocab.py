"""Next-token NLL of several hidden states at the loss-mask targets only, chunked over rows.

For hidden states h_s [B,T,D] (s = 0..S−1; e.g. every layer's output for a logit lens, or just
the last one for a plain LM loss) and target weights w[b,t] = loss_mask[b,t+1]:

    sums[s] = Σ_{b,t} w[b,t] · (logsumexp_v z_s[b,t,v] − z_s[b,t,ids[b,t+1]]),
    z_s     = lm_head(final_norm(h_s)),                 count = Σ_{b,t} w[b,t]

How it projects only the weighted positions, with static shapes:
- the B·T positions are sorted stably so the weighted ones come first (an argsort of w == 0), and
  the rows (position, state) are laid out position-major, so the first count·S rows are exactly
  the weighted positions of every state (one gather of `states`);
- the rows are cut into chunks of `chunk` rows (the last one padded with weight 0) and a
  `lax.scan` runs over them; a chunk is projected through the vocabulary only if it holds a
  weighted row (`lax.cond`), so a batch with n targets costs ⌈n·S/chunk⌉ projections of
  [chunk, D] × [D, V], whatever B·T is, and all states share each projection;
- each chunk runs under `jax.checkpoint`, so the backward pass recomputes its [chunk, V] logits
  instead of storing them: no [B,T,V] array exists, in the forward or the backward.
Rows of different sequences share a chunk, so under batch sharding the gather moves hidden states
between devices. The result equals the full-vocabulary masked CE of `lm_head(final_norm(h_s))` up
to the order of the sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdefense.models.decoder import logits_from_hidden, shifted_targets

DEFAULT_CHUNK = 256


def _row_nll(cfg, params, states, input_ids, loss_mask, chunk):
    """Weighted NLL of each projected row (position, state): (per_row [R], state [R] (numpy),
    position [R] (flat b·T + t), weights [B,T]); rows past the weighted ones carry weight 0."""
    S, B, T, D = states.shape
    N = B * T
    acc = jnp.promote_types(states.dtype, jnp.float32)
    targets, weights = shifted_targets(input_ids, loss_mask, acc)
    w, t = weights.reshape(N), targets.reshape(N)
    order = jnp.argsort((w == 0).astype(jnp.int32), stable=True)
    rows = N * S
    chunk = max(1, min(int(chunk), rows))
    n_chunks = -(-rows // chunk)
    r = np.arange(n_chunks * chunk)
    position, state = np.minimum(r // S, N - 1), r % S
    real = jnp.asarray(r < rows)
    pos = order[position]
    w_rows = jnp.where(real, w[pos], 0).reshape(n_chunks, chunk)
    t_rows = t[pos].reshape(n_chunks, chunk)
    h_rows = jnp.take(states.reshape(S * N, D), jnp.asarray(state) * N + pos, axis=0).reshape(n_chunks, chunk, D)
    head = {k: params[k] for k in ("final_norm", "embed", "lm_head") if k in params}

    def project(h, t, w):
        z = logits_from_hidden(cfg, head, h).astype(acc)
        picked = jnp.take_along_axis(z, t[:, None], axis=-1)[:, 0]
        return w * (jax.nn.logsumexp(z, axis=-1) - picked)

    @jax.checkpoint
    def chunk_nll(h, t, w):
        return lax.cond(jnp.any(w != 0), project, lambda h, t, w: jnp.zeros(w.shape, acc), h, t, w)

    def body(carry, xs):
        return carry, chunk_nll(*xs)

    _, per_row = lax.scan(body, None, (h_rows, t_rows, w_rows))
    return per_row.reshape(-1), state, pos, weights


def masked_nll_sums(cfg, params, states: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                    *, chunk: int = DEFAULT_CHUNK):
    """(sums [S], count): weighted next-token NLL of each hidden state at the loss-mask targets.

    Args:
      cfg: the ModelConfig (tie_embeddings, rms_norm_eps).
      params: needs only "final_norm" and "embed" (tied) or "lm_head".
      states: [S,B,T,D] hidden states before the final norm.
      input_ids: [B,T] token ids; the target of position t is ids[t+1].
      loss_mask: [B,T]; position t's weight is loss_mask[t+1].
      chunk: rows (position, state) projected through the vocabulary at once (static).
    Returns:
      sums [S] and count = Σ weights, both in float32 (float64 for float64 states).
    """
    per_row, state, _, weights = _row_nll(cfg, params, states, input_ids, loss_mask, chunk)
    sums = jnp.zeros((states.shape[0],), per_row.dtype).at[jnp.asarray(state)].add(per_row)
    return sums, jnp.sum(weights)


def masked_nll_positions(cfg, params, states: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                         *, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """[S,B,T]: w[b,t]·nll_s[b,t] at every position (0 where the weight is 0), the terms that
    `masked_nll_sums` adds up (sums = this summed over B and T, up to the order of the sum)."""
    per_row, state, pos, _ = _row_nll(cfg, params, states, input_ids, loss_mask, chunk)
    S, (B, T) = states.shape[0], input_ids.shape
    return jnp.zeros((S, B * T), per_row.dtype).at[jnp.asarray(state), pos].add(per_row).reshape(S, B, T)


def masked_state_ce(cfg, params, states: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                    *, chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """[S] masked token-mean CE Σ w·nll_s / max(Σ w, 1) of each hidden state (see `masked_nll_sums`)."""
    sums, count = masked_nll_sums(cfg, params, states, input_ids, loss_mask, chunk=chunk)
    return sums / jnp.maximum(count, 1.0)

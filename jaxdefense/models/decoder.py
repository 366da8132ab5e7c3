"""One pre-norm decoder for Llama 2/3.x, Qwen2/2.5 and Qwen3, as pure functions of a param dict.

Layer l (stacked on a leading L axis and scanned):
    h = x + Attn(RMSNorm(x)) @ Wo,    x' = h + W_down(silu(RMSNorm(h) W_gate) * RMSNorm(h) W_up)
Attention is causal with padding, grouped-query (query head h uses kv head h // G), RoPE in
the HF rotate-half form computed in float32, softmax in float32.
Precision: compute follows the params' dtype; norms, RoPE, softmax and logits are float32.
The params layout is declared in `models.layout`; `decoder_layer` is the one block, with an
optional KV cache, that the forward pass and KV-cache generation (`models.generate`) share.

Sharding: activations are constrained to the logical layouts of `models.sharding_rules`
(residual stream batch-split over data·fsdp, heads and MLP width over tensor) at the embedding
output, at each layer boundary and inside attention and the MLP, whenever a mesh is active
(`jax.set_mesh`, or the training loop's step); without one the constraints are the identity.
Each scanned layer is rematerialised by `cfg.remat`. The losses (`lm_loss`, `token_nll`) project
onto the vocabulary in token chunks of at most LOGIT_CHUNK_ELEMENTS / V positions, each chunk
rematerialised in the backward pass, so no [B, T, V] array exists whole.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdefense.models import sharding_rules as rules
from jaxdefense.models.config import ModelConfig
from jaxdefense.models.layout import BY_NAME
from jaxdefense.models.lora import merge_layer
from jaxdefense.models.sharding_rules import constrain

_MASKED = -1e30
SCAN_UNROLL_MAX_LAYERS = int(os.environ.get("JAXDEFENSE_SCAN_UNROLL_MAX_LAYERS", "8"))
# Logits per sequence row in one chunk of the chunked cross-entropy (T_chunk · V ≤ this).
LOGIT_CHUNK_ELEMENTS = int(os.environ.get("JAXDEFENSE_LOGIT_CHUNK_ELEMENTS", str(2 ** 24)))


def scan_unroll(cfg: ModelConfig) -> int:
    """Layers per scan step: all of them for shallow models (XLA:CPU then skips the stacked
    residual buffers of a while loop), 1 for deep ones (compile time grows with the unroll)."""
    return cfg.num_layers if cfg.num_layers <= SCAN_UNROLL_MAX_LAYERS else 1


def _wide(dtype):
    """float32, or float64 when the input already is (finite-difference checks run in x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w over the last axis as one 2-D matmul, accumulated in ≥ float32.

    XLA:CPU runs [N,D]@[D,O] ~2× faster than the equivalent 3-D dot, and bf16×bf16→f32 dots
    ~2.7× faster than bf16→bf16 ones (AVX-512 bf16); the result is cast back to x's dtype.
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, preferred_element_type=_wide(x.dtype)).astype(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """y = w · x / sqrt(mean(x²) + eps), statistics in float32 (HF LlamaRMSNorm)."""
    x32 = x.astype(_wide(x.dtype))
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """θ_i = base^(-2i/Dh) in float32, with the Llama 3.1 "llama3" wavelength-dependent scaling."""
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.float32(cfg.rope_theta) ** exponent).astype(np.float32)
    if cfg.rope_scaling is None:
        return inv_freq
    s = dict(cfg.rope_scaling)
    factor, low, high = np.float32(s["factor"]), s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_table(cfg: ModelConfig, positions: jax.Array):
    """(cos, sin) of positions · θ, float32 [B,T,1,Dh/2]; computed once per pass, shared by layers."""
    angles = positions.astype(jnp.float32)[:, :, None, None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope) -> jax.Array:
    """Rotate-half RoPE: [x1, x2] → [x1 cos − x2 sin, x2 cos + x1 sin]; x [B,T,H,Dh], in float32."""
    cos, sin = rope
    x1, x2 = jnp.split(x.astype(_wide(x.dtype)), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def project_qkv(cfg: ModelConfig, p: dict, h: jax.Array, rope):
    """q [B,T,Hk,G,Dh] (pre-scaled by Dh^-1/2), k and v [B,T,Hk,Dh]; bias, q/k-norm and RoPE applied."""
    B, T, _ = h.shape
    Hk, Dh = cfg.num_kv_heads, cfg.head_dim
    q, k, v = dense(h, p["wq"]), dense(h, p["wk"]), dense(h, p["wv"])
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(B, T, cfg.num_heads, Dh)
    k = k.reshape(B, T, Hk, Dh)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, rope) * jnp.asarray(Dh ** -0.5, q.dtype)
    k = apply_rope(k, rope)
    q = constrain(q.reshape(B, T, Hk, cfg.num_heads // Hk, Dh), rules.QUERY)
    return q, constrain(k, rules.KEY_VALUE), constrain(v.reshape(B, T, Hk, Dh), rules.KEY_VALUE)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q kᵀ + mask) v per kv group, no kv repeat; mask bool [B,T,S] → out [B,T,Hq·Dh]."""
    B, T, Hk, G, Dh = q.shape
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=_wide(q.dtype))
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return constrain(out.reshape(B, T, Hk * G * Dh), rules.ATTN_OUT)


def mlp(p: dict, h: jax.Array) -> jax.Array:
    """SwiGLU: (silu(h W_gate) ⊙ h W_up) W_down."""
    hidden = constrain(jax.nn.silu(dense(h, p["w_gate"])) * dense(h, p["w_up"]), rules.MLP_HIDDEN)
    return dense(hidden, p["w_down"])


def decoder_layer(cfg: ModelConfig, p: dict, x: jax.Array, rope, mask: jax.Array, cache=None, index=None):
    """One pre-norm block: h = x + Attn(RMSNorm(x)) Wo, x' = h + MLP(RMSNorm(h)); returns (x', kv).

    x [B,T,D]; rope = rope_table(cfg, positions of x's tokens); mask bool [B,T,S] over the keys.
    Without a cache the keys are x's own (S = T: forward, prefill) and kv = (k, v) [B,T,Hk,Dh].
    With cache = (k_cache, v_cache) [L,B,Hk,S,Dh] (heads before slots: the attention dots read a
    layer's cache in place, with no per-token transpose) and index = (layer, slot), x's k, v are
    written at [layer, :, :, slot:slot+T], attention runs over that layer's whole cache, and kv is
    the updated cache.
    """
    q, k, v = project_qkv(cfg, p, rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), rope)
    if cache is None:
        kv = (k, v)
    else:
        layer, slot = index
        kv = tuple(lax.dynamic_update_slice(c, jnp.swapaxes(new, 1, 2)[None].astype(c.dtype), (layer, 0, 0, slot, 0))
                   for c, new in zip(cache, (k, v)))
        k, v = (jnp.swapaxes(lax.dynamic_index_in_dim(c, layer, 0, False), 1, 2) for c in kv)
    x = constrain(x + dense(attend(q, k, v, mask), p["wo"]), rules.RESIDUAL)
    return constrain(x + mlp(p, rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)), rules.RESIDUAL), kv


def remat_layer(cfg: ModelConfig, layer):
    """`layer` under `cfg.remat`: itself ("none"), `jax.checkpoint` saving the outputs of
    matmuls without batch dimensions — the weight projections, not the attention einsums
    ("dots-saveable"), or saving nothing but its inputs ("everything")."""
    if cfg.remat == "none":
        return layer
    policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots-saveable"
              else jax.checkpoint_policies.nothing_saveable)
    return jax.checkpoint(layer, policy=policy, prevent_cse=False)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """bool [B,T,T]: query t sees real keys s ≤ t; a pad query sees only itself (no NaN, no leak)."""
    T = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((T, T), jnp.bool_))
    return causal[None] & ((attention_mask[:, None, :] > 0) | jnp.eye(T, dtype=jnp.bool_)[None])


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position of each real token among the real tokens of its row (cumsum − 1; pads get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _head_weight(cfg: ModelConfig, params: dict) -> jax.Array:
    """The output projection's weight: embed [V, D] when tied (one array), else lm_head [D, V]."""
    name = "embed" if cfg.tie_embeddings else "lm_head"
    return constrain(params[name], BY_NAME[name].logical_axes)


def _project(cfg: ModelConfig, w: jax.Array, h: jax.Array) -> jax.Array:
    """Logits h @ W (tied: h @ embedᵀ) in ≥ float32, constrained to the LOGITS layout."""
    flat = h.reshape(-1, h.shape[-1])
    if cfg.tie_embeddings:
        logits = lax.dot_general(flat, w, (((1,), (1,)), ((), ())), preferred_element_type=_wide(h.dtype))
    else:
        logits = jnp.dot(flat, w, preferred_element_type=_wide(h.dtype))
    return constrain(logits.reshape(*h.shape[:-1], logits.shape[-1]), rules.LOGITS)


def _head(cfg: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
    """Output projection of final-normed h (tied: h @ embedᵀ, one array); float32 logits."""
    return _project(cfg, _head_weight(cfg, params), h)


def logits_from_hidden(cfg: ModelConfig, params: dict, x: jax.Array) -> jax.Array:
    """Final RMSNorm then the (possibly tied) output projection; float32 logits."""
    return _head(cfg, params, rms_norm(x, params["final_norm"], cfg.rms_norm_eps))


def constrain_params(params: dict) -> dict:
    """Each weight of the layout constrained to its logical axes (`models.layout`) on the context
    mesh. The constraint's transpose and jvp apply the same sharding to cotangents and tangents,
    so gradients and HVPs w.r.t. the params come out sharded like the params, whoever calls."""

    def one(name, x):
        w = BY_NAME.get(name)
        return constrain(x, w.logical_axes) if w is not None and len(w.logical_axes) == x.ndim else x

    out = {k: one(k, v) for k, v in params.items() if k != "layers"}
    if "layers" in params:
        out["layers"] = {k: one(k, v) for k, v in params["layers"].items()}
    return out


def decoder_stack(cfg: ModelConfig, params: dict, input_ids: jax.Array, attention_mask=None, lora=None,
                  hidden_perturb=None, return_hidden: bool = False, *, start_hidden=None, layers=None,
                  positions=None, attn_mask=None):
    """Residual stream after the last layer run [B,T,D] (pre final norm) and, if asked, all of them.

    Args:
      input_ids: [B,T] token ids, embedded as the stream entering the first layer run; may be
        None when start_hidden is given.
      attention_mask: [B,T] (1 real, 0 pad); positions come from its cumsum.
      lora: {"layers": {name: {"a": [L,...], "b": [L,...]}}, "scale": s}, merged per layer.
      hidden_perturb: [L,B,T,D] added to each layer's output.
      layers: static (lo, hi): run only layers lo..hi−1, slicing params["layers"], lora["layers"]
        and hidden_perturb [lo:hi] on their leading (layer) axis; default every layer stacked
        in params["layers"]. Running [0, k) then [k, L) from the first run's output is the
        whole stack.
      start_hidden: [B,T,D] residual stream entering layer lo (default the embedding of input_ids).
      positions: [B,T] RoPE positions (default: from attention_mask's cumsum).
      attn_mask: bool [B,T,T], query t may attend key s (default: causal_mask(attention_mask)), e.g.
        several continuations packed after one shared prompt (`eval.metrics.continuation_logprobs`).
    Returns:
      (x [B,T,D], hidden [hi−lo+1,B,T,D] or None): the stream entering layer lo, then each run
      layer's output (after its perturbation).
    """
    n_stacked = jax.tree.leaves(params["layers"])[0].shape[0]
    lo, hi = (0, n_stacked) if layers is None else layers
    if not 0 <= lo <= hi <= n_stacked:
        raise ValueError(f"decoder_stack layers: ({lo}, {hi}) is not a range within the {n_stacked} stacked layers")
    B, T = (input_ids if start_hidden is None else start_hidden).shape[:2]
    params = constrain_params(params)
    if attention_mask is None:
        attention_mask = jnp.ones((B, T), jnp.int32)
    rope = rope_table(cfg, positions_from_mask(attention_mask) if positions is None else positions)
    mask = constrain(causal_mask(attention_mask) if attn_mask is None else attn_mask, (*rules.TOKENS, None))
    if start_hidden is None:
        x = constrain(jnp.take(params["embed"], input_ids, axis=0), rules.RESIDUAL)
    else:
        x = constrain(start_hidden, rules.RESIDUAL)

    def in_range(stacked):
        return stacked if (lo, hi) == (0, n_stacked) else jax.tree.map(lambda w: w[lo:hi], stacked)

    lora_layers = None if lora is None else in_range(lora["layers"])
    lora_scale = None if lora is None else lora["scale"]

    def layer(x, layer_inputs):
        p, layer_lora, perturb = layer_inputs
        if layer_lora is not None:
            p = merge_layer(p, layer_lora, lora_scale)
        x, _ = decoder_layer(cfg, p, constrain(x, rules.RESIDUAL), rope, mask)
        if perturb is not None:
            x = constrain(x + perturb.astype(x.dtype), rules.RESIDUAL)
        return x

    layer = remat_layer(cfg, layer)

    def body(x, layer_inputs):
        x = layer(x, layer_inputs)
        return x, (x if return_hidden else None)

    x_out, hidden = lax.scan(body, x, (in_range(params["layers"]), lora_layers, in_range(hidden_perturb)),
                             unroll=scan_unroll(cfg))
    return x_out, (jnp.concatenate([x[None], hidden], axis=0) if return_hidden else None)


def forward(cfg: ModelConfig, params: dict, input_ids: jax.Array, *, attention_mask=None, lora=None,
            hidden_perturb=None, return_hidden: bool = False):
    """Logits [B,T,V] (float32) of a pure decoder pass.

    attention_mask [B,T] (1 real, 0 pad; left or right padding); positions come from its cumsum.
    lora: {"layers": {name: {"a": [L,in,r], "b": [L,r,out]}}, "scale": s}, merged as W + s·a@b.
    hidden_perturb [L,B,T,D] is added to each layer's output (the residual stream).
    return_hidden → (logits, hidden [L+1,B,T,D]): the embedding output, then each layer's output
    (after its perturbation). Unlike HF hidden_states, the last entry is *before* the final norm.
    """
    x, hidden = decoder_stack(cfg, params, input_ids, attention_mask, lora, hidden_perturb, return_hidden)
    logits = logits_from_hidden(cfg, params, x)
    return (logits, hidden) if return_hidden else logits


def shifted_targets(input_ids, loss_mask, dtype):
    """Targets ids[t+1] and weights loss_mask[t+1] at each position t (weight 0 at t = T−1)."""
    B = input_ids.shape[0]
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros((B, 1), input_ids.dtype)], axis=1)
    weights = jnp.concatenate([loss_mask[:, 1:].astype(dtype), jnp.zeros((B, 1), dtype)], axis=1)
    return targets, weights


def next_token_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array):
    """nll[b,t] = logsumexp(z[b,t]) − z[b,t,ids[b,t+1]] and its weight loss_mask[b,t+1] (0 at t = T−1)."""
    dtype = _wide(logits.dtype)
    targets, weights = shifted_targets(input_ids, loss_mask, dtype)
    logits = logits.astype(dtype)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked, weights


def _chunk_nll(cfg: ModelConfig, w: jax.Array, h: jax.Array, targets: jax.Array) -> jax.Array:
    """nll = logsumexp(z) − z[target] of z = h W for h [B,C,D] and targets [B,C]; float32 [B,C].
    The target logit is selected by comparison with a vocabulary iota (elementwise, so a
    vocab-sharded z needs no gather)."""
    logits = _project(cfg, w, h)
    hit = lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    picked = jnp.sum(jnp.where(hit, logits, jnp.zeros((), logits.dtype)), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


def logit_chunk_tokens(seq_len: int, vocab_size: int) -> int:
    """Positions per cross-entropy chunk: ceil(T / n) for the fewest n chunks with chunk · V ≤
    LOGIT_CHUNK_ELEMENTS (T when the whole row fits)."""
    limit = max(1, LOGIT_CHUNK_ELEMENTS // max(vocab_size, 1))
    n = -(-seq_len // limit)
    return -(-seq_len // n)


def _nll_from_stack(cfg: ModelConfig, params: dict, x: jax.Array, input_ids, loss_mask):
    """next_token_nll [B,T] and weights from the last residual stream, in token chunks.

    nll[b,t] = logsumexp_v(h[b,t] · W[:, v]) − h[b,t] · W[:, ids[b,t+1]] with h = RMSNorm(x).
    When T · V > LOGIT_CHUNK_ELEMENTS the positions are cut into n chunks (the last padded) and
    mapped with `lax.map` over a rematerialised chunk function, so one chunk's [B, C, V] logits
    exist at a time in the forward, the backward and forward-mode (jvp) passes alike. The head
    weight enters the map in ≥ float32, so its gradient accumulates over chunks in float32.
    """
    dtype = _wide(x.dtype)
    targets, weights = shifted_targets(input_ids, loss_mask, dtype)
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    w = _head_weight(cfg, params)
    B, T, D = h.shape
    chunk = logit_chunk_tokens(T, w.shape[0] if cfg.tie_embeddings else w.shape[1])
    if chunk >= T:
        return _chunk_nll(cfg, w, h, targets), weights
    n = -(-T // chunk)
    pad = n * chunk - T
    h_chunks = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    t_chunks = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)
    w_wide = w.astype(_wide(w.dtype))

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(w_wide, h_c, t_c):
        return _chunk_nll(cfg, w_wide.astype(w.dtype), constrain(h_c, rules.RESIDUAL), t_c)

    nll = lax.map(lambda xs: one(w_wide, *xs), (h_chunks, t_chunks))
    return nll.swapaxes(0, 1).reshape(B, n * chunk)[:, :T], weights


def lm_loss(cfg: ModelConfig, params: dict, batch: dict, *, lora=None, hidden_perturb=None) -> jax.Array:
    """Mean next-token cross-entropy over the targets marked by batch["loss_mask"] (float32)."""
    x, _ = decoder_stack(cfg, params, batch["input_ids"], batch.get("attention_mask"), lora, hidden_perturb)
    nll, weights = _nll_from_stack(cfg, params, x, batch["input_ids"], batch["loss_mask"])
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def token_nll(cfg: ModelConfig, params: dict, batch: dict, *, lora=None) -> jax.Array:
    """Per-sequence mean NLL [B] over the loss_mask targets (0 for rows without targets)."""
    x, _ = decoder_stack(cfg, params, batch["input_ids"], batch.get("attention_mask"), lora)
    nll, weights = _nll_from_stack(cfg, params, x, batch["input_ids"], batch["loss_mask"])
    return jnp.sum(nll * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)

"""Batched sampling with a KV cache (k, v caches [L, B, Hk, S, Dh]) through `decoder_layer`.

Prompts are left-aligned on the host (right-padded rows are moved), padded on the left to a
multiple of PROMPT_BUCKET (P), the new-token budget to a power of two ≥ MIN_NEW_BUCKET (N), and
the cache to S = P + N (rounded up to CACHE_BUCKET). Two compiled functions per call, no host
round trip per token:
  `_prefill_jit`  (batch, P, S): the prompt in one pass (layers scanned), caches filled at [0, P);
  `_generate_jit` (batch, S, N): a `lax.while_loop` decoding one token per step (P is traced),
                  stopping once every row has emitted a stop token or the budget is spent
                  (n new tokens cost n − 1 decode steps).
With S = P + N that is one decode compilation per (batch, prompt bucket, budget bucket); rounding S
up to 128 lets prompt buckets share it, but measured 1.3× slower decode steps at batch 32 on XLA:CPU.
Rows that finished emit `pad_id` (the stop token itself is kept). Both passes scan the layers
(unrolling the 30 decode layers of SmolLM2 measured no faster per token on XLA:CPU and took
≈ 4× longer to compile).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdefense.data.formatting import apply_chat, encode_prompts
from jaxdefense.errors import ConfigError, DataError
from jaxdefense.models.config import ModelConfig
from jaxdefense.models.decoder import causal_mask, decoder_layer, logits_from_hidden, positions_from_mask, rope_table
from jaxdefense.models.lora import merge

PROMPT_BUCKET = 32
MIN_NEW_BUCKET = 16
CACHE_BUCKET = 32  # = PROMPT_BUCKET: S = P + N (every decode step attends over, and slices, the whole cache)
STOP_SLOTS = 8


def _bucket_new(n: int) -> int:
    return max(MIN_NEW_BUCKET, 1 << (n - 1).bit_length())


def _left_align(ids: np.ndarray, mask: np.ndarray, bucket: int, pad_id: int):
    """Move each row's real tokens to the right end of a width-`bucket` multiple row."""
    B, T = ids.shape
    width = -(-T // bucket) * bucket
    out_ids = np.full((B, width), pad_id, np.int32)
    out_mask = np.zeros((B, width), np.int32)
    for b in range(B):
        real = ids[b][mask[b] > 0]
        if real.size == 0:
            raise DataError(f"prompt row {b}: no real tokens (attention mask all zero)")
        out_ids[b, width - real.size:] = real
        out_mask[b, width - real.size:] = 1
    return out_ids, out_mask


def _sample(logits, key, temperature, top_p, greedy: bool, nucleus: bool):
    """argmax, or a draw from softmax(z / T) restricted to the smallest top-p nucleus."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits / temperature
    if nucleus:
        sorted_z = jnp.sort(z, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_z, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_z, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z >= threshold, z, -jnp.inf)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def _prefill(cfg, params, ids, mask):
    """Run the prompt; return last-position logits [B,V] and per-layer k, v [L,B,P,Hk,Dh]."""
    rope, attn_mask = rope_table(cfg, positions_from_mask(mask)), causal_mask(mask)

    def layer(x, p):
        return decoder_layer(cfg, p, x, rope, attn_mask)

    x, (ks, vs) = lax.scan(layer, jnp.take(params["embed"], ids, axis=0), params["layers"])
    return logits_from_hidden(cfg, params, x[:, -1:])[:, 0], ks, vs


def _entropy(logits):
    """H(softmax(z)) = logsumexp(z) − Σ softmax(z)·z per row, float32."""
    z = logits.astype(jnp.float32)
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)


def _cache_size(prompt_width: int, new_bucket: int) -> int:
    return -(-(prompt_width + new_bucket) // CACHE_BUCKET) * CACHE_BUCKET


@functools.partial(jax.jit, static_argnames=("cfg", "cache_size"))
def _prefill_jit(params, ids, mask, *, cfg: ModelConfig, cache_size: int):
    """The prompt pass: last-position logits [B,V], caches k, v [L,B,Hk,cache_size,Dh] holding the prompt
    at slots [0, P), the valid-key mask [B, cache_size] and each row's last position [B]."""
    B, P = ids.shape
    logits, ks, vs = _prefill(cfg, params, ids, mask)
    pad_kv = ((0, 0), (0, 0), (0, 0), (0, cache_size - P), (0, 0))
    valid = jnp.concatenate([mask > 0, jnp.zeros((B, cache_size - P), jnp.bool_)], axis=1)
    caches = tuple(jnp.pad(jnp.swapaxes(c, 2, 3), pad_kv) for c in (ks, vs))
    return logits, caches, valid, positions_from_mask(mask)[:, -1]


def _decode_step(cfg, params, tok, pos, slot, caches, valid):
    """Logits [B,V] for one new token per row at cache slot `slot`; caches (k, v) [L,B,Hk,S,Dh] updated in place."""
    step_mask, rope = valid[:, None, :], rope_table(cfg, pos[:, None])

    def layer(carry, inputs):
        x, cache = carry
        p, index = inputs
        return decoder_layer(cfg, p, x, rope, step_mask, cache, (index, slot)), None

    x = jnp.take(params["embed"], tok, axis=0)[:, None]
    (x, caches), _ = lax.scan(layer, (x, caches), (params["layers"], jnp.arange(cfg.num_layers)))
    return logits_from_hidden(cfg, params, x)[:, 0], caches


@functools.partial(jax.jit, static_argnames=("cfg", "greedy", "nucleus", "new_bucket", "pad_id", "with_entropy"))
def _generate_jit(params, logits, caches, valid, last_pos, prompt_width, key, temperature, top_p, stops, n_new, *,
                  cfg: ModelConfig, greedy: bool, nucleus: bool, new_bucket: int, pad_id: int,
                  with_entropy: bool = False):
    """The decode loop after `_prefill_jit`: tokens [B, new_bucket] and, if asked, their entropies.

    prompt_width (traced) is the prefill width P: new token i goes to cache slot P + i, so one
    compilation serves every prompt bucket with the same cache size."""
    B = logits.shape[0]
    entropy = jnp.zeros((B, new_bucket if with_entropy else 0), jnp.float32)

    def record(entropy, i, logits):
        return lax.dynamic_update_slice(entropy, _entropy(logits)[:, None], (0, i)) if with_entropy else entropy

    key, sub = jax.random.split(key)
    state = (jnp.int32(0), _sample(logits, sub, temperature, top_p, greedy, nucleus), jnp.zeros((B,), jnp.bool_),
             jnp.full((B, new_bucket), pad_id, jnp.int32), record(entropy, 0, logits), caches, valid, key)

    def cond(state):
        i, _, done, *_ = state
        return (i < n_new - 1) & ~jnp.all(done)

    def body(state):
        i, tok, done, out, entropy, caches, valid, key = state
        out = out.at[:, i].set(jnp.where(done, pad_id, tok))
        done = done | jnp.any(tok[:, None] == stops[None, :], axis=-1)
        slot = prompt_width + i
        valid = lax.dynamic_update_slice(valid, jnp.ones((B, 1), jnp.bool_), (0, slot))
        logits, caches = _decode_step(cfg, params, tok, last_pos + 1 + i, slot, caches, valid)
        key, sub = jax.random.split(key)
        tok = _sample(logits, sub, temperature, top_p, greedy, nucleus)
        return i + 1, tok, done, out, record(entropy, i + 1, logits), caches, valid, key

    i, tok, done, out, entropy, *_ = lax.while_loop(cond, body, state)
    return out.at[:, i].set(jnp.where(done, pad_id, tok)), entropy


def generate(cfg: ModelConfig, params: dict, prompt_ids, prompt_mask=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens=(), key=None, lora=None,
             pad_id: int | None = None, return_entropy: bool = False):
    """New tokens [B, max_new_tokens] after each prompt (greedy when temperature == 0).

    prompt_mask [B,P]: 1 real, 0 pad (left- or right-padded). After a row emits one of
    `stop_tokens` it emits `pad_id` (default cfg.pad_token_id, else its first eos, else 0).
    return_entropy → (tokens, entropy [B, max_new_tokens]): entropy[b, t] = H(softmax(z)) of the
    untempered next-token logits z that produced tokens[b, t] (meaningless after the row stopped).
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be ≥ 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"temperature/top_p: need temperature ≥ 0 and 0 < top_p ≤ 1, got {temperature}, {top_p}")
    greedy = temperature == 0
    if not greedy and key is None:
        raise ConfigError("key: a PRNG key is required when temperature > 0")
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids or (0,))[0]
    stops = tuple(int(t) for t in stop_tokens)
    slots = max(STOP_SLOTS, 1 << max(len(stops) - 1, 0).bit_length())
    stop_arr = np.full((slots,), -1, np.int32)
    stop_arr[: len(stops)] = stops
    ids = np.asarray(prompt_ids, np.int32)
    mask = np.ones_like(ids) if prompt_mask is None else np.asarray(prompt_mask, np.int32)
    ids, mask = _left_align(ids, mask, PROMPT_BUCKET, pad_id)
    if lora is not None:
        params = merge(params, lora)
    new_bucket = _bucket_new(max_new_tokens)
    prefill = _prefill_jit(params, ids, mask, cfg=cfg, cache_size=_cache_size(ids.shape[1], new_bucket))
    out, entropy = _generate_jit(params, *prefill, jnp.int32(ids.shape[1]), jax.random.key(0) if key is None else key,
                                 jnp.float32(temperature), jnp.float32(top_p), stop_arr, jnp.int32(max_new_tokens),
                                 cfg=cfg, greedy=greedy, nucleus=not greedy and top_p < 1.0, new_bucket=new_bucket,
                                 pad_id=int(pad_id), with_entropy=bool(return_entropy))
    if return_entropy:
        return out[:, :max_new_tokens], entropy[:, :max_new_tokens]
    return out[:, :max_new_tokens]


def generate_text(cfg: ModelConfig, params: dict, tokenizer, prompts, *, max_new_tokens: int = 64,
                  chat: bool = True, temperature: float = 0.0, top_p: float = 1.0, key=None,
                  stop_tokens=None, lora=None) -> list[str]:
    """Decoded completions of `prompts` (strings), formatted by `data.formatting.apply_chat` when `chat`.

    Stop tokens default to the config's and the tokenizer's eos ids.
    """
    texts = [apply_chat(tokenizer, p) if chat else p for p in prompts]
    ids, mask = encode_prompts(tokenizer, texts, chat=chat)
    if stop_tokens is None:
        stop_tokens = set(cfg.eos_ids)
        if tokenizer.eos_token_id is not None:
            stop_tokens.add(int(tokenizer.eos_token_id))
    stop_tokens = tuple(sorted(stop_tokens))
    out = np.asarray(generate(cfg, params, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, stop_tokens=stop_tokens, key=key, lora=lora))
    texts = []
    for row in out:
        stop_at = [i for i, t in enumerate(row) if t in stop_tokens]
        row = row[: stop_at[0]] if stop_at else row
        texts.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return texts

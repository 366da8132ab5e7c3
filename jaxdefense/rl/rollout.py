"""Rollouts: K samples per prompt from the batched KV-cache sampler (`models.generate`), as a
fixed-shape teacher-forcing batch with the rollout pass's log-probs and entropies.

Prompts come from an ordinary stream batch (right-padded prompt + response rows): the prompt of
a row is its real tokens before the first loss token. They are left-aligned to a multiple of
`generate.PROMPT_BUCKET` (as the sampler does), each repeated K times (row b·K + j), and the
new-token budget is fixed, so the sampler and the rollout pass compile once per
(batch, prompt bucket, budget). The rollout batch is

    input_ids      [B·K, P + N]   left-padded prompt | response tokens (pad after the stop token)
    attention_mask [B·K, P + N]   1 on the prompt's real tokens and the response up to its stop token
    loss_mask      [B·K, P + N]   1 on the response tokens (incl. the stop token)

Sampling is seeded by the key given (the loop's fold_in(key(seed), step)), so a resumed run
draws the same rollouts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.errors import DataError
from jaxdefense.models.generate import PROMPT_BUCKET, _left_align, generate
from jaxdefense.rl.grpo import token_logps


def prompts_of(batch) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [B, T] of each row's prompt: real tokens before its first loss token (rows
    without a loss token keep every real token)."""
    ids = np.asarray(batch["input_ids"], np.int32)
    real = np.asarray(batch["attention_mask"]) > 0
    loss = np.asarray(batch["loss_mask"]) > 0
    first = np.where(loss.any(axis=1), loss.argmax(axis=1), ids.shape[1])
    mask = real & (np.arange(ids.shape[1])[None, :] < first[:, None])
    if not mask.any(axis=1).all():
        raise DataError(f"rollout prompts: row {int(np.argmin(mask.any(axis=1)))} has no prompt token")
    return ids, mask.astype(np.int32)


def response_mask(tokens, stop_tokens) -> np.ndarray:
    """[N, M] 1 up to and including each row's first stop token (every position without one)."""
    tokens = np.asarray(tokens)
    if not len(stop_tokens):
        return np.ones(tokens.shape, np.int32)
    stop = np.isin(tokens, np.asarray(stop_tokens))
    before = np.cumsum(stop, axis=1) - stop  # stop tokens strictly before t
    return (before == 0).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _rollout_pass(params, reference, batch, *, cfg):
    logp, weights, entropy = token_logps(cfg, params, batch, with_entropy=True)
    ref = token_logps(cfg, reference, batch)[0] if reference is not None else logp
    return logp, ref, entropy, weights


def sample(cfg, params, prompt_ids, prompt_mask, *, k: int, max_new_tokens: int, key, temperature: float = 1.0,
           top_p: float = 1.0, stop_tokens=(), pad_id: int | None = None) -> dict[str, np.ndarray]:
    """The rollout batch of the module docstring (numpy) plus "response" [B·K, N] (the new tokens)."""
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids or (0,))[0]
    ids, mask = _left_align(np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32), PROMPT_BUCKET,
                            int(pad_id))
    ids, mask = np.repeat(ids, k, axis=0), np.repeat(mask, k, axis=0)
    new = np.asarray(generate(cfg, params, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, stop_tokens=tuple(stop_tokens), key=key, pad_id=int(pad_id)))
    resp = response_mask(new, stop_tokens)
    return {"input_ids": np.concatenate([ids, new], axis=1).astype(np.int32),
            "attention_mask": np.concatenate([mask, resp], axis=1).astype(np.int32),
            "loss_mask": np.concatenate([np.zeros_like(mask), resp], axis=1).astype(np.float32),
            "response": new.astype(np.int32)}


def rollout_pass(cfg, params, reference, batch) -> dict[str, np.ndarray]:
    """{"old_logp", "ref_logp", "entropy", "weights"} [B·K, T] of a rollout batch (jitted once per
    shape; reference None: ref_logp = old_logp)."""
    arrays = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
    out = _rollout_pass(params, reference, arrays, cfg=cfg)
    return dict(zip(("old_logp", "ref_logp", "entropy", "weights"), (np.asarray(x) for x in out)))


def decode_rows(tokenizer, ids, mask) -> list[str]:
    """Text of each row's masked tokens (special tokens skipped)."""
    ids, mask = np.asarray(ids), np.asarray(mask) > 0
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(ids, mask)]

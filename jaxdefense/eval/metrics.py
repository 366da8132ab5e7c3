"""Harmfulness-, utility- and collapse-metrics of a model: NLLs, multiple-choice accuracy,
task accuracy, generations and their diversity / repetition / entropy.

Model-side functions take `(cfg, params, tokenizer, ...)`; batches have a fixed row count and
a length rounded up to a multiple of `LEN_BUCKET`, so one compilation serves a whole eval.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.errors import ConfigError, DataError

LEN_BUCKET = 32


def _bucket(n: int, bucket: int = LEN_BUCKET) -> int:
    return max(bucket, -(-n // bucket) * bucket)


@functools.partial(jax.jit, static_argnums=(0,))
def _nll_sums(cfg, params, input_ids, attention_mask, loss_mask):
    """Σ_t nll and Σ_t weight per row over the loss_mask targets (float32)."""
    from jaxdefense.models import forward, next_token_nll

    logits = forward(cfg, params, input_ids, attention_mask=attention_mask)
    nll, weights = next_token_nll(logits, input_ids, loss_mask)
    return jnp.sum(nll * weights, axis=1), jnp.sum(weights, axis=1)


@functools.partial(jax.jit, static_argnums=(0,))
def _entropy_sums(cfg, params, input_ids, attention_mask, loss_mask):
    """Σ_t H(p_t) and Σ_t weight per row, H = logsumexp(z) − Σ softmax(z)·z at each predicting position."""
    from jaxdefense.models import forward

    logits = forward(cfg, params, input_ids, attention_mask=attention_mask).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    weights = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1).astype(jnp.float32)
    return jnp.sum(entropy * weights, axis=1), jnp.sum(weights, axis=1)


def _run_rows(fn, cfg, params, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, batch_size: int,
              on_batch=None):
    """Apply a per-row-sum fn to (ids, loss_mask) rows in fixed-shape, right-padded batches.

    on_batch(n): called after each batch with its number of real rows (progress reporting)."""
    if not rows:
        return np.zeros((0,)), np.zeros((0,))
    width = _bucket(max(len(ids) for ids, _ in rows))
    sums, counts = [], []
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start : start + batch_size])
        n_real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n_real)
        ids = np.full((batch_size, width), pad_id, np.int32)
        attn = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for b, (row_ids, row_mask) in enumerate(chunk):
            ids[b, : len(row_ids)] = row_ids
            attn[b, : len(row_ids)] = 1
            mask[b, : len(row_ids)] = row_mask
        s, c = fn(cfg, params, ids, attn, mask)
        sums.append(np.asarray(s, np.float64)[:n_real])
        counts.append(np.asarray(c, np.float64)[:n_real])
        if on_batch is not None:
            on_batch(n_real)
    return np.concatenate(sums), np.concatenate(counts)


def _pad_id(tokenizer) -> int:
    from jaxdefense.data.batching import pad_id_of

    return pad_id_of(tokenizer)


# ---------------------------------------------------------------- NLL of responses


def response_nll(cfg, params, tokenizer, records: Sequence[dict], *, max_len: int = 256, batch_size: int = 8,
                 template="chat", on_batch=None) -> dict:
    """Mean NLL (nats/token) of each record's response given its prompt (response tokens + EOS).

    Returns {"nll": token-weighted mean Σnll/Σtokens, "nll_per_seq": mean of per-sequence means, "n": rows}.
    """
    from jaxdefense.data.batching import encode_example

    if not records:
        raise DataError("response_nll: no records")
    rows = []
    for i, r in enumerate(records):
        enc = encode_example(tokenizer, r["prompt"], r["response"], max_len, template, record=r, index=i)
        rows.append((enc.input_ids, enc.loss_mask))
    sums, counts = _run_rows(_nll_sums, cfg, params, rows, _pad_id(tokenizer), batch_size, on_batch)
    return {
        "nll": float(sums.sum() / max(counts.sum(), 1.0)),
        "nll_per_seq": float(np.mean(sums / np.maximum(counts, 1.0))),
        "n": len(rows),
    }


def stream_nll(cfg, params, tokenizer, stream: str, *, data_dir=None, split: str = "test", n: int = 64,
               **kw) -> dict:
    """`response_nll` of the first n records of a pair stream (harmful_qa → harmful NLL, benign_instruct → benign NLL)."""
    from jaxdefense.data import load_stream

    return response_nll(cfg, params, tokenizer, load_stream(stream, split, data_dir, limit=n), **kw)


# ---------------------------------------------------------------- multiple choice


def continuation_logprobs(cfg, params, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 8,
                          max_len: int = 256, on_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """log p(continuation | context) summed over the continuation's tokens, and its token count.

    Context ids = tokenizer(context) (with the tokenizer's BOS); continuation ids =
    tokenizer(continuation, add_special_tokens=False); the context is cut from the left when
    the pair exceeds max_len.
    """
    rows = []
    for context, continuation in pairs:
        ctx = list(tokenizer(context)["input_ids"])
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if not cont:
            raise DataError(f"continuation {continuation!r} has no tokens")
        if not ctx:
            raise DataError(f"context {context!r} has no tokens (the first continuation token needs one)")
        cont = cont[: max_len - 1]
        ctx = ctx[max(0, len(ctx) + len(cont) - max_len):]
        ids = ctx + cont
        mask = [0] * len(ctx) + [1] * len(cont)
        mask[0] = 0
        rows.append((ids, mask))
    sums, counts = _run_rows(_nll_sums, cfg, params, rows, _pad_id(tokenizer), batch_size, on_batch)
    return -sums, counts


def mc_scores(cfg, params, tokenizer, stream: str, records: Sequence[dict], **kw) -> tuple[list[list[float]], list[list[float]]]:
    """Per record, per choice: (sum log-prob, log-prob / UTF-8 bytes of the continuation) — lm-eval's acc / acc_norm."""
    from jaxdefense.data import mc_pairs

    pairs, owners = [], []
    for i, record in enumerate(records):
        for pair in mc_pairs(stream, record):
            pairs.append(pair)
            owners.append(i)
    logp, _ = continuation_logprobs(cfg, params, tokenizer, pairs, **kw)
    raw = [[] for _ in records]
    norm = [[] for _ in records]
    for (_, continuation), i, lp in zip(pairs, owners, logp):
        raw[i].append(float(lp))
        norm[i].append(float(lp) / max(1, len(continuation.encode("utf-8"))))
    return raw, norm


def mc_accuracy(cfg, params, tokenizer, stream: str, records: Sequence[dict], **kw) -> dict:
    """Zero-shot accuracy by log-likelihood: acc = argmax Σ log p; acc_norm = argmax Σ log p / bytes."""
    from jaxdefense.data import mc_accuracy as accuracy_of

    if not records:
        raise DataError(f"{stream}: no multiple-choice records")
    raw, norm = mc_scores(cfg, params, tokenizer, stream, records, **kw)
    chance = float(np.mean([1.0 / len(r["choices"]) for r in records]))
    return {"acc": accuracy_of(raw, records), "acc_norm": accuracy_of(norm, records), "n": len(records),
            "chance": chance}


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class Generations:
    prompts: list[str]
    texts: list[str]
    token_ids: list[list[int]]  # generated ids, up to (excluding) the first stop token
    prompt_ids: list[list[int]]


def generate_samples(cfg, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                     batch_size: int = 8, chat: bool = True, temperature: float = 0.0, seed: int = 0,
                     on_batch=None) -> Generations:
    """Greedy (or sampled) completions in fixed-size batches, with their token ids (on_batch(n) after each)."""
    from jaxdefense.data.formatting import apply_chat, encode_prompts
    from jaxdefense.models import generate

    if not prompts:
        return Generations([], [], [], [])
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
    stops = set(cfg.eos_ids)
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    stops = tuple(sorted(stops))
    texts_in = [apply_chat(tokenizer, p) if chat else p for p in prompts]
    out_texts, out_ids, out_prompt_ids = [], [], []
    key = jax.random.key(seed)
    for start in range(0, len(texts_in), batch_size):
        chunk = texts_in[start : start + batch_size]
        n_real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n_real)
        ids, mask = encode_prompts(tokenizer, chunk, chat=chat)
        key, sub = jax.random.split(key)
        gen = np.asarray(generate(cfg, params, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                                  stop_tokens=stops, key=sub if temperature > 0 else None))
        for b in range(n_real):
            row = gen[b].tolist()
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            row = row[:cut]
            out_ids.append(row)
            out_texts.append(tokenizer.decode(row, skip_special_tokens=True))
            out_prompt_ids.append(ids[b][mask[b] > 0].tolist())
        if on_batch is not None:
            on_batch(n_real)
    return Generations(list(prompts), out_texts, out_ids, out_prompt_ids)


def generation_entropy(cfg, params, generations: Generations, *, pad_id: int = 0, batch_size: int = 8,
                       on_batch=None) -> float:
    """Mean entropy (nats) of the model's next-token distribution at each generated position.

    Teacher-forced on the model's own output, so for greedy decoding these are exactly the
    distributions seen while generating: H̄ = Σ_{rows,t} H(p_t) / Σ_{rows} |generation|.
    """
    rows = [
        (p + g, [0] * len(p) + [1] * len(g))
        for p, g in zip(generations.prompt_ids, generations.token_ids)
        if g
    ]
    if not rows:
        return float("nan")
    sums, counts = _run_rows(_entropy_sums, cfg, params, rows, pad_id, batch_size, on_batch)
    return float(sums.sum() / max(counts.sum(), 1.0))


def task_accuracy(cfg, params, tokenizer, task: str, records: Sequence[dict], *, max_new_tokens: int | None = None,
                  batch_size: int = 8, on_batch=None) -> dict:
    """Greedy generation on each record's prompt, scored by the task's metric (jaxdefense.data.TASKS)."""
    from jaxdefense.data import TASKS

    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if max_new_tokens is None:
        max_new_tokens = 256 if task == "gsm8k" else 8
    gens = generate_samples(cfg, params, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                            batch_size=batch_size, on_batch=on_batch)
    return {"accuracy": TASKS[task].accuracy(gens.texts, records), "n": len(records), "examples": gens.texts[:3]}


# ---------------------------------------------------------------- collapse metrics on text


def _as_tokens(seq) -> list:
    return seq.split() if isinstance(seq, str) else list(seq)


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence, n: int) -> float:
    """Corpus distinct-n (Li et al. 2016): #unique n-grams / #n-grams over all sequences.

    Strings are split on whitespace; lists of token ids are used as they are. NaN if no n-gram.
    """
    total, unique = 0, set()
    for seq in sequences:
        grams = ngrams(_as_tokens(seq), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else float("nan")


def repetition_rate(sequences: Sequence, n: int = 2) -> float:
    """Mean over sequences of seq-rep-n (Welleck et al. 2019): 1 − #unique n-grams / #n-grams within a sequence.

    Sequences with no n-gram are skipped; NaN if none has one.
    """
    rates = []
    for seq in sequences:
        grams = ngrams(_as_tokens(seq), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else float("nan")


def max_token_run(sequence) -> int:
    """Length of the longest run of one repeated token."""
    tokens = _as_tokens(sequence)
    best = run = 0
    prev = object()
    for t in tokens:
        run = run + 1 if t == prev else 1
        prev = t
        best = max(best, run)
    return best


def collapse_metrics(texts: Sequence[str], token_ids: Sequence[Sequence[int]] | None = None) -> dict:
    """distinct-1/2 and seq-rep-2/4 of whitespace words, mean longest token run, empty fraction, mean length."""
    out = {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition": repetition_rate(texts, 2),
        "repetition_4": repetition_rate(texts, 4),
        "empty_fraction": float(np.mean([not t.strip() for t in texts])) if texts else float("nan"),
        "mean_words": float(np.mean([len(t.split()) for t in texts])) if texts else float("nan"),
    }
    if token_ids is not None:
        out["max_token_run"] = float(np.mean([max_token_run(ids) for ids in token_ids])) if token_ids else float("nan")
        out["mean_tokens"] = float(np.mean([len(ids) for ids in token_ids])) if token_ids else float("nan")
        out["token_distinct_2"] = distinct_n(token_ids, 2)
    return out

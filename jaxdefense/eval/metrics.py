"""Harmfulness-, utility- and collapse-metrics of a model: NLLs, multiple-choice accuracy,
task accuracy, generations and their diversity / repetition / entropy.

Model-side functions take `(cfg, params, tokenizer, ...)`. Rows are sorted by length before
batching (results come back in input order) and each batch has a fixed row count and a width
from `row_width` (LEN_BUCKET·2^k up to 4·LEN_BUCKET, then multiples of 4·LEN_BUCKET), so short
rows are not padded to the longest one and a whole eval compiles a handful of shapes.
Generation records each row's next-token entropy while decoding (`Generations.entropy`), so
`generation_entropy` needs no second pass over the generations.
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


def row_width(n: int) -> int:
    """Padded width of a batch whose longest row has n tokens: 32, 64, 128, then multiples of 128."""
    width = LEN_BUCKET
    while width < n and width < 4 * LEN_BUCKET:
        width *= 2
    return width if n <= width else _bucket(n, 4 * LEN_BUCKET)


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first); every index appears once.

    max_tokens: a batch of padded width w keeps at most max_tokens // w rows, halved from batch_size
    (so a few very long rows do not pad a whole batch to their length)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, start = [], 0
    while start < len(order):
        rows = batch_rows(row_width(lengths[order[start]]), batch_size, max_tokens)
        batches.append(order[start : start + rows])
        start += rows
    return batches


def batch_rows(width: int, batch_size: int, max_tokens: int | None) -> int:
    """Rows of a batch of padded width `width`: batch_size, halved while rows · width > max_tokens."""
    rows = batch_size
    while max_tokens is not None and rows > 1 and rows * width > max_tokens:
        rows //= 2
    return rows


GEN_PROMPT_TOKENS = 256  # generation batches hold at most batch_size · GEN_PROMPT_TOKENS padded prompt tokens


def segment_mask(attention_mask, segments):
    """bool [B,T,T]: causal attention where a key of segment 0 (the shared prefix) is seen by every
    later query and a key of segment k > 0 only by queries of segment k; a pad query sees itself.
    With every segment 0 this is `models.decoder.causal_mask`."""
    T = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((T, T), jnp.bool_))
    visible = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    return causal[None] & (((attention_mask[:, None, :] > 0) & visible) | jnp.eye(T, dtype=jnp.bool_)[None])


@functools.partial(jax.jit, static_argnums=(0,))
def _nll_terms(cfg, params, input_ids, attention_mask, loss_mask, positions, segments):
    """(w·nll, w) at every position [B,T] (float32), w[t] = loss_mask[t+1]; only the target
    positions are projected through the vocabulary (`models.vocab.masked_nll_positions`)."""
    from jaxdefense.models.decoder import decoder_stack, shifted_targets
    from jaxdefense.models.vocab import masked_nll_positions

    x, _ = decoder_stack(cfg, params, input_ids, attention_mask, positions=positions,
                         attn_mask=segment_mask(attention_mask, segments))
    terms = masked_nll_positions(cfg, params, x[None], input_ids, loss_mask)[0]
    return terms, shifted_targets(input_ids, loss_mask, terms.dtype)[1]


@functools.partial(jax.jit, static_argnums=(0,))
def _entropy_terms(cfg, params, input_ids, attention_mask, loss_mask, positions, segments):
    """(w·H(p_t), w) at every position [B,T], H = logsumexp(z) − Σ softmax(z)·z at each predicting position."""
    from jaxdefense.models.decoder import decoder_stack, logits_from_hidden, shifted_targets

    x, _ = decoder_stack(cfg, params, input_ids, attention_mask, positions=positions,
                         attn_mask=segment_mask(attention_mask, segments))
    logp = jax.nn.log_softmax(logits_from_hidden(cfg, params, x).astype(jnp.float32), axis=-1)
    weights = shifted_targets(input_ids, loss_mask, jnp.float32)[1]
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1) * weights, weights


def _row_positions(segments: np.ndarray) -> np.ndarray:
    """RoPE positions of a row: the prefix (segment 0) counts from 0 and every segment k > 0
    continues from the prefix's length, as if it alone followed the prefix."""
    prefix = int(np.sum(segments == 0))
    positions = np.arange(len(segments))
    for k in np.unique(segments[segments > 0]):
        where = np.flatnonzero(segments == k)
        positions[where] = prefix + np.arange(len(where))
    return positions


def _run_rows(fn, cfg, params, rows: Sequence[tuple], pad_id: int, batch_size: int, on_batch=None, units=None):
    """Apply a per-position fn to rows (ids, loss_mask[, segments]) in fixed-row-count, right-padded
    batches of similar length.

    segments (default all 0): 0 for a shared prefix, k > 0 for the k-th of several continuations
    packed after it (`segment_mask`, `_row_positions`). Returns, in row order, (terms, weights):
    float64 arrays of the row's length. on_batch(n): called after each batch with its number of real
    rows (or the sum of their `units`, one count per row)."""
    out: list = [None] * len(rows)
    for index in length_batches([len(row[0]) for row in rows], batch_size):
        chunk = [rows[i] for i in index]
        n_real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n_real)
        width = row_width(max(len(row[0]) for row in chunk))
        ids = np.full((batch_size, width), pad_id, np.int32)
        attn = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        positions = np.zeros((batch_size, width), np.int32)
        segments = np.zeros((batch_size, width), np.int32)
        for b, row in enumerate(chunk):
            n = len(row[0])
            ids[b, :n], attn[b, :n], mask[b, :n] = row[0], 1, row[1]
            if len(row) > 2:
                segments[b, :n] = row[2]
            positions[b, :n] = _row_positions(segments[b, :n])
        terms, weights = fn(cfg, params, ids, attn, mask, positions, segments)
        terms, weights = np.asarray(terms, np.float64), np.asarray(weights, np.float64)
        for b, i in enumerate(index):
            n = len(rows[i][0])
            out[i] = (terms[b, :n], weights[b, :n])
        if on_batch is not None:
            on_batch(n_real if units is None else sum(units[i] for i in index))
    return out


def _row_sums(terms) -> tuple[np.ndarray, np.ndarray]:
    """(Σ_t terms, Σ_t weights) per row of `_run_rows`' output."""
    return (np.asarray([t.sum() for t, _ in terms]), np.asarray([w.sum() for _, w in terms]))


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
    sums, counts = _row_sums(_run_rows(_nll_terms, cfg, params, rows, _pad_id(tokenizer), batch_size, on_batch))
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
    the pair exceeds max_len. Consecutive pairs with one context (the choices of a question) share
    one row of at most max_len tokens: context[:-1], then per continuation its own copy of the
    context's last token followed by the continuation, each attending to the shared part and to
    itself only, at the positions it would have alone (`segment_mask`), so the context is run once.
    """
    encoded = []
    for context, continuation in pairs:
        ctx = list(tokenizer(context)["input_ids"])
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if not cont:
            raise DataError(f"continuation {continuation!r} has no tokens")
        if not ctx:
            raise DataError(f"context {context!r} has no tokens (the first continuation token needs one)")
        encoded.append((context, ctx, cont))
    rows, owners = [], []  # owners[r]: (pair index, segment) of each continuation in row r
    start = 0
    while start < len(encoded):
        stop = start + 1
        while stop < len(encoded) and encoded[stop][0] == encoded[start][0]:
            stop += 1
        ctx = encoded[start][1]
        group = [encoded[i][2] for i in range(start, stop)]
        if stop - start > 1 and len(ctx) - 1 + sum(1 + len(c) for c in group) <= max_len:
            ids, mask, segments = ctx[:-1], [0] * (len(ctx) - 1), [0] * (len(ctx) - 1)
            for k, cont in enumerate(group, start=1):
                ids += [ctx[-1]] + cont
                mask += [0] + [1] * len(cont)
                segments += [k] * (1 + len(cont))
            rows.append((ids, mask, segments))
            owners.append([(start + k - 1, k) for k in range(1, len(group) + 1)])
        else:
            for i in range(start, stop):
                cont = encoded[i][2][: max_len - 1]
                cut = encoded[i][1][max(0, len(encoded[i][1]) + len(cont) - max_len):]
                rows.append((cut + cont, [0] * len(cut) + [1] * len(cont)))
                owners.append([(i, None)])
        start = stop
    logp, counts = np.zeros(len(pairs)), np.zeros(len(pairs))
    scored = _run_rows(_nll_terms, cfg, params, rows, _pad_id(tokenizer), batch_size, on_batch,
                       units=[len(owned) for owned in owners])
    for row, (terms, weights), owned in zip(rows, scored, owners):
        for i, k in owned:
            where = slice(None) if k is None else np.asarray(row[2]) == k
            logp[i], counts[i] = -terms[where].sum(), weights[where].sum()
    return logp, counts


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
    entropy: list[float] | None = None  # per row, Σ_t H(p_t) over the positions that produced token_ids


def generate_samples(cfg, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                     batch_size: int = 8, chat: bool = True, temperature: float = 0.0, seed: int = 0,
                     on_batch=None) -> Generations:
    """Greedy (or sampled) completions in batches of similar prompt length, returned in prompt order,
    with their token ids and next-token entropies (on_batch(n) after each batch).

    Batches have batch_size rows (at most the power of two ≥ len(prompts); the last batch padded with
    copies), fewer (halved) for prompts so long that batch_size rows would exceed
    batch_size · GEN_PROMPT_TOKENS padded prompt tokens.
    """
    from jaxdefense.data.formatting import apply_chat, encode_prompts
    from jaxdefense.models import generate

    if not prompts:
        return Generations([], [], [], [], [])
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
    batch_size = min(batch_size, 1 << (len(prompts) - 1).bit_length())
    stops = set(cfg.eos_ids)
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    stops = tuple(sorted(stops))
    texts_in = [apply_chat(tokenizer, p) if chat else p for p in prompts]
    all_ids, all_mask = encode_prompts(tokenizer, texts_in, chat=chat)
    lengths = all_mask.sum(axis=1).tolist()
    n = len(prompts)
    out_texts, out_ids, out_prompt_ids, out_entropy = [""] * n, [[]] * n, [[]] * n, [0.0] * n
    key = jax.random.key(seed)
    for index in length_batches(lengths, batch_size, batch_size * GEN_PROMPT_TOKENS):
        n_real = len(index)
        width = row_width(lengths[index[0]])
        rows = batch_rows(width, batch_size, batch_size * GEN_PROMPT_TOKENS)
        index_full = index + [index[-1]] * (rows - n_real)
        ids = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), np.int32)
        take = min(width, all_ids.shape[1])
        ids[:, -take:], mask[:, -take:] = all_ids[index_full, -take:], all_mask[index_full, -take:]
        key, sub = jax.random.split(key)
        gen, entropy = generate(cfg, params, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                                stop_tokens=stops, key=sub if temperature > 0 else None, return_entropy=True)
        gen, entropy = np.asarray(gen), np.asarray(entropy, np.float64)
        for b, i in enumerate(index):
            row = gen[b].tolist()
            cut = next((t for t, token in enumerate(row) if token in stops), len(row))
            out_ids[i] = row[:cut]
            out_texts[i] = tokenizer.decode(row[:cut], skip_special_tokens=True)
            out_prompt_ids[i] = ids[b][mask[b] > 0].tolist()
            out_entropy[i] = float(entropy[b, :cut].sum())
        if on_batch is not None:
            on_batch(n_real)
    return Generations(list(prompts), out_texts, out_ids, out_prompt_ids, out_entropy)


def generation_entropy(cfg, params, generations: Generations, *, pad_id: int = 0, batch_size: int = 8,
                       on_batch=None) -> float:
    """Mean entropy (nats) of the model's next-token distribution at each generated position.

    H̄ = Σ_{rows,t} H(p_t) / Σ_{rows} |generation|, H(p) = −Σ_v p_v log p_v. The p_t are the
    distributions that produced the tokens: recorded during decoding when `generations.entropy` is
    set (by `generate_samples` with these cfg, params), else teacher-forced on the model's own output
    (for greedy decoding the same distributions, up to float rounding).
    """
    if generations.entropy is not None:
        tokens = sum(len(g) for g in generations.token_ids)
        if on_batch is not None:
            on_batch(len(generations.token_ids))
        return float(sum(generations.entropy) / tokens) if tokens else float("nan")
    rows = [
        (p + g, [0] * len(p) + [1] * len(g))
        for p, g in zip(generations.prompt_ids, generations.token_ids)
        if g
    ]
    if not rows:
        return float("nan")
    sums, counts = _row_sums(_run_rows(_entropy_terms, cfg, params, rows, pad_id, batch_size, on_batch))
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

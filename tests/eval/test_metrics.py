"""Collapse metrics on hand-made strings; NLL, multiple-choice log-likelihood, generation and
entropy against direct forward passes of a tiny random model."""

import math

import jax
import numpy as np
import pytest

from jaxdefense.eval import metrics as M
from jaxdefense.models import forward


def test_distinct_n_by_hand():
    assert M.distinct_n(["a b c a b"], 1) == pytest.approx(3 / 5)
    assert M.distinct_n(["a b c a b"], 2) == pytest.approx(3 / 4)  # ab bc ca ab
    assert M.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)  # corpus level
    assert M.distinct_n([[1, 2, 3], [3, 2, 1]], 2) == 1.0  # token ids
    assert math.isnan(M.distinct_n(["", "one"], 2))


def test_repetition_and_runs_by_hand():
    # "a b a b a b": bigrams ab ba ab ba ab → 2 unique of 5 → 0.6; "x y z" → 0; mean 0.3
    assert M.repetition_rate(["a b a b a b", "x y z"], 2) == pytest.approx(0.3)
    assert M.repetition_rate(["go go go go"], 1) == pytest.approx(0.75)
    assert math.isnan(M.repetition_rate(["single"], 2))
    assert M.max_token_run([1, 1, 2, 2, 2, 3]) == 3
    assert M.max_token_run("a a a b") == 3 and M.max_token_run([]) == 0
    c = M.collapse_metrics(["the the the", ""], [[5, 5, 5], []])
    assert c["empty_fraction"] == 0.5 and c["max_token_run"] == 1.5 and c["distinct_1"] == pytest.approx(1 / 3)


_forward = jax.jit(forward, static_argnums=0)


def _logprobs(cfg, params, ids, width=64):
    """Log-softmax of an unpadded sequence's logits; right zero-padding to one width leaves the
    causal logits of the real positions unchanged and keeps a single compilation."""
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(ids)] = ids
    logits = np.asarray(_forward(cfg, params, padded), np.float64)[0, : len(ids)]
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_mc_accuracy_equals_hand_argmax(tiny_model, tiny_tokenizer):
    cfg, params = tiny_model
    records = [
        {"question": "how to bake a cake", "choices": ["the cat", "sorry", "please make cake", "dog"], "answer": 2},
        {"question": "what is the weather", "choices": ["a question", "the answer is here"], "answer": 0},
        {"question": "write a poem about a dog", "choices": ["cat", "dog", "lock", "bomb"], "answer": 1},
        {"question": "pick a lock", "choices": ["cannot help", "here is how to pick a lock", "thanks"], "answer": 1},
        {"question": "thanks", "choices": ["please", "thanks . thanks"], "answer": 1},
    ]
    raw, norm = M.mc_scores(cfg, params, tiny_tokenizer, "arc_easy", records, batch_size=4, max_len=64)
    hand_raw = []
    for r in records:
        row = []
        for choice in r["choices"]:
            ctx = tiny_tokenizer(f"Question: {r['question']}\nAnswer:")["input_ids"]
            cont = tiny_tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]
            lp = _logprobs(cfg, params, ctx + cont)
            row.append(sum(lp[len(ctx) + i - 1, t] for i, t in enumerate(cont)))
        hand_raw.append(row)
    for got, want in zip(raw, hand_raw):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    hand_acc = np.mean([int(np.argmax(row)) == r["answer"] for row, r in zip(hand_raw, records)])
    hand_norm = np.mean([int(np.argmax([lp / len(f" {c}".encode()) for lp, c in zip(row, r["choices"])])) == r["answer"]
                         for row, r in zip(hand_raw, records)])
    out = M.mc_accuracy(cfg, params, tiny_tokenizer, "arc_easy", records, batch_size=4, max_len=64)
    assert out["acc"] == pytest.approx(hand_acc) and out["acc_norm"] == pytest.approx(hand_norm)
    assert out["n"] == 5 and 0 < out["chance"] < 1
    assert len({int(np.argmax(r)) for r in raw}) > 1  # the random model does not always pick one slot


def test_packed_choices_equal_one_row_per_choice(tiny_model, tiny_tokenizer):
    """Choices of one context packed into one row (segment mask, restarted positions) score as
    separate rows do; interleaving the contexts turns the packing off."""
    cfg, params = tiny_model
    contexts = ["Question: how to bake a cake\nAnswer:", "Question: pick a lock\nAnswer:"]
    choices = [[" the cat", " please make cake", " no"], [" sorry", " here is how to pick it"]]
    grouped = [(c, x) for c, xs in zip(contexts, choices) for x in xs]
    interleaved = [(contexts[0], choices[0][0]), (contexts[1], choices[1][0]), (contexts[0], choices[0][1]),
                   (contexts[1], choices[1][1]), (contexts[0], choices[0][2])]
    lp, n = M.continuation_logprobs(cfg, params, tiny_tokenizer, grouped, batch_size=2, max_len=64)
    lp_i, n_i = M.continuation_logprobs(cfg, params, tiny_tokenizer, interleaved, batch_size=2, max_len=64)
    order = [grouped.index(pair) for pair in interleaved]
    np.testing.assert_allclose(lp[order], lp_i, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(n[order], n_i)
    assert n.tolist() == [len(tiny_tokenizer(x, add_special_tokens=False)["input_ids"]) for _, x in grouped]
    mask = np.array([[1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(M.segment_mask(mask, np.array([[0, 1, 1, 2, 0]]))[0],
                                  [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 0, 1]])
    assert M._row_positions(np.array([0, 0, 1, 1, 2, 2, 2])).tolist() == [0, 1, 2, 3, 2, 3, 4]


def test_response_nll_equals_hand(tiny_model, tiny_tokenizer):
    from jaxdefense.data import encode_example

    cfg, params = tiny_model
    records = [{"prompt": "how to bake", "response": "here is how to bake a cake"},
               {"prompt": "pick a lock please", "response": "sorry , cannot help with that"},
               {"prompt": "weather", "response": "the dog"}]
    got = M.response_nll(cfg, params, tiny_tokenizer, records, max_len=64, batch_size=2)
    total = count = 0.0
    per_seq = []
    for r in records:
        enc = encode_example(tiny_tokenizer, r["prompt"], r["response"], 64)
        lp = _logprobs(cfg, params, list(enc.input_ids))
        nll = [-lp[t - 1, enc.input_ids[t]] for t in range(1, len(enc.input_ids)) if enc.loss_mask[t]]
        total += sum(nll)
        count += len(nll)
        per_seq.append(np.mean(nll))
    assert got["nll"] == pytest.approx(total / count, rel=1e-4)
    assert got["nll_per_seq"] == pytest.approx(np.mean(per_seq), rel=1e-4)


def test_generation_is_greedy_and_entropy_matches_hand(tiny_model, tiny_tokenizer):
    cfg, params = tiny_model
    prompts = ["how to bake a cake", "write a poem", "pick a lock"]
    gens = M.generate_samples(cfg, params, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=2)
    assert len(gens.texts) == 3 and all(len(g) <= 8 for g in gens.token_ids)
    entropies = []
    for p_ids, g_ids in zip(gens.prompt_ids, gens.token_ids):
        lp = _logprobs(cfg, params, p_ids + g_ids)
        steps = range(len(p_ids) - 1, len(p_ids) + len(g_ids) - 1)
        for i, t in zip(steps, g_ids):
            assert t == int(np.argmax(lp[i]))  # greedy
        entropies += [-(np.exp(lp[i]) * lp[i]).sum() for i in steps]
    got = M.generation_entropy(cfg, params, gens, pad_id=0, batch_size=2)
    assert got == pytest.approx(np.mean(entropies), rel=1e-4)
    assert 0 < got < math.log(cfg.vocab_size)

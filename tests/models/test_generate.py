"""KV-cache generation: agreement with the full forward pass, padding, stops, buckets, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense.errors import ConfigError
from jaxdefense.models import forward, generate, init_params, named_config
from jaxdefense.models.generate import _generate_jit, _prefill_jit

CFG = named_config("tiny-qwen2")  # biases + tied head; the cache path shares project_qkv with forward
N_NEW = 12


@pytest.fixture(scope="module")
def setup():
    params = jax.tree.map(lambda x: x * 4, init_params(CFG, jax.random.key(0)))  # non-degenerate argmax
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, CFG.vocab_size, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(prompt)
    mask[1, :4] = 0
    mask[2, :2] = 0
    prompt[mask == 0] = 0
    greedy = np.asarray(generate(CFG, params, prompt, mask, max_new_tokens=N_NEW))
    return params, prompt, mask, greedy


def test_greedy_equals_argmax_of_full_forward(setup):
    """Teacher-forcing the generated tokens through forward() reproduces each greedy choice."""
    params, prompt, mask, greedy = setup
    assert greedy.shape == (3, N_NEW) and greedy.dtype == np.int32
    assert len(np.unique(greedy)) > 6
    ids = np.concatenate([prompt, greedy], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(greedy)], axis=1)
    logits = jax.jit(forward, static_argnums=0)(CFG, params, jnp.asarray(ids), attention_mask=jnp.asarray(full_mask))
    predicted = np.asarray(jnp.argmax(logits[:, prompt.shape[1] - 1:-1], axis=-1))
    np.testing.assert_array_equal(predicted, greedy)


def test_right_padding_equals_left_padding_and_one_compile_per_bucket(setup):
    params, prompt, mask, greedy = setup
    right_ids, right_mask = np.zeros_like(prompt), np.zeros_like(mask)
    for b in range(3):
        real = prompt[b][mask[b] > 0]
        right_ids[b, : real.size], right_mask[b, : real.size] = real, 1
    def compiles():
        return _prefill_jit._cache_size(), _generate_jit._cache_size()

    before = compiles()
    out = np.asarray(generate(CFG, params, right_ids, right_mask, max_new_tokens=N_NEW))
    np.testing.assert_array_equal(out, greedy)
    shorter = np.asarray(generate(CFG, params, prompt[:, 2:], mask[:, 2:], max_new_tokens=N_NEW - 3))
    assert shorter.shape == (3, N_NEW - 3)
    assert compiles() == before, "same (batch, prompt bucket, budget bucket) recompiled"
    # a 40-token prompt: prompt bucket 64, one new prefill and one new decode loop (cache 64 + 16)
    long_prompt = np.random.default_rng(2).integers(3, CFG.vocab_size, size=(3, 40)).astype(np.int32)
    long_out = np.asarray(generate(CFG, params, long_prompt, max_new_tokens=N_NEW))
    assert compiles() == (before[0] + 1, before[1] + 1)
    logits = forward(CFG, params, jnp.asarray(np.concatenate([long_prompt, long_out], axis=1)))
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, 39:-1], axis=-1)), long_out)


def test_stop_tokens_then_pad(setup):
    params, prompt, mask, greedy = setup
    stop = int(greedy[0, 4])
    out = np.asarray(generate(CFG, params, prompt, mask, max_new_tokens=N_NEW, stop_tokens=(stop, 511)))
    for row, ref in zip(out, greedy):
        hits = np.flatnonzero(ref == stop)
        end = hits[0] + 1 if hits.size else N_NEW  # the stop token itself is kept
        np.testing.assert_array_equal(row[:end], ref[:end])
        assert (row[end:] == CFG.pad_token_id).all()
    assert (out[0, 5:] == CFG.pad_token_id).all()


def test_sampling(setup):
    params, prompt, mask, greedy = setup
    key = jax.random.key(3)
    a = np.asarray(generate(CFG, params, prompt, mask, max_new_tokens=N_NEW, temperature=1.0, key=key))
    b = np.asarray(generate(CFG, params, prompt, mask, max_new_tokens=N_NEW, temperature=1.0, key=key))
    np.testing.assert_array_equal(a, b)
    assert (a != greedy).any()
    nucleus_of_one = generate(CFG, params, prompt, mask, max_new_tokens=N_NEW, temperature=0.7, top_p=1e-6, key=key)
    np.testing.assert_array_equal(np.asarray(nucleus_of_one), greedy)
    with pytest.raises(ConfigError, match="key"):
        generate(CFG, params, prompt, mask, max_new_tokens=4, temperature=1.0)


def test_entropy_recorded_while_decoding_equals_teacher_forced(setup):
    """return_entropy: H(softmax(z_t)) of the logits that produced token t, equal to the full forward pass's."""
    params, prompt, mask, greedy = setup
    out, entropy = generate(CFG, params, prompt, mask, max_new_tokens=N_NEW, return_entropy=True)
    np.testing.assert_array_equal(np.asarray(out), greedy)
    ids = np.concatenate([prompt, greedy], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(greedy)], axis=1)
    logits = forward(CFG, params, jnp.asarray(ids), attention_mask=jnp.asarray(full_mask))[:, prompt.shape[1] - 1:-1]
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = -(np.exp(logp) * logp).sum(-1)
    assert entropy.shape == (3, N_NEW) and want.std() > 0.05
    np.testing.assert_allclose(np.asarray(entropy), want, rtol=2e-4, atol=1e-5)


def test_budget_edges_one_token_and_exact_bucket(setup):
    """n new tokens take n − 1 decode steps: 1 token comes from the prefill alone; a budget equal to
    its bucket (16) fills every slot; both are prefixes of a longer greedy run."""
    params, prompt, mask, _ = setup
    long = np.asarray(generate(CFG, params, prompt, mask, max_new_tokens=20))
    one = np.asarray(generate(CFG, params, prompt, mask, max_new_tokens=1))
    full = np.asarray(generate(CFG, params, prompt, mask, max_new_tokens=16))
    np.testing.assert_array_equal(one, long[:, :1])
    np.testing.assert_array_equal(full, long[:, :16])

"""Rollouts: greedy = `generate`, seeded sampling reproducible, a GRPO run resumes bit-identically."""

import jax
import numpy as np
import optax
import pytest

from jaxdefense.methods.tokenbuncher import TokenBuncher
from jaxdefense.models import generate, init_params, named_config
from jaxdefense.rl.rollout import prompts_of, response_mask, rollout_pass, sample
from jaxdefense.train import read_metrics, train

TINY = named_config("tiny")
STOPS = (2,)


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


def _prompts(seed=0, batch=2, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY.vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, -3:] = 0  # a right-padded row
    return ids, mask


def test_prompts_of_a_stream_batch():
    ids = np.array([[5, 6, 7, 8, 0]], np.int32)
    batch = {"input_ids": ids, "attention_mask": np.array([[1, 1, 1, 1, 0]]),
             "loss_mask": np.array([[0, 0, 1, 1, 0]], np.float32)}
    _, mask = prompts_of(batch)
    assert mask.tolist() == [[1, 1, 0, 0, 0]]
    assert response_mask(np.array([[4, 2, 0, 0], [4, 5, 6, 7]]), STOPS).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_greedy_rollouts_equal_generate_and_the_teacher_forced_argmax(params):
    ids, mask = _prompts()
    roll = sample(TINY, params, ids, mask, k=2, max_new_tokens=10, key=jax.random.key(0), temperature=0.0,
                  stop_tokens=STOPS)
    ref = np.asarray(generate(TINY, params, ids, mask, max_new_tokens=10, stop_tokens=STOPS))
    np.testing.assert_array_equal(roll["response"], np.repeat(ref, 2, axis=0))
    P = roll["input_ids"].shape[1] - 10
    np.testing.assert_array_equal(roll["input_ids"][:, P:], roll["response"])
    # The KV-cache sampler's greedy tokens are the argmax of the teacher-forced pass on the assembled rows.
    from jaxdefense.models import forward

    logits = np.asarray(forward(TINY, params, roll["input_ids"], attention_mask=roll["attention_mask"]))
    resp = roll["loss_mask"] > 0
    pred = logits[:, :-1].argmax(-1)
    np.testing.assert_array_equal(pred[resp[:, 1:]], roll["input_ids"][:, 1:][resp[:, 1:]])
    aux = rollout_pass(TINY, params, params, roll)
    np.testing.assert_array_equal(aux["old_logp"], aux["ref_logp"])


def test_seeded_sampling_is_reproducible(params):
    ids, mask = _prompts(1)
    kw = dict(k=3, max_new_tokens=8, temperature=1.0, top_p=0.9, stop_tokens=STOPS)
    a = sample(TINY, params, ids, mask, key=jax.random.key(4), **kw)
    b = sample(TINY, params, ids, mask, key=jax.random.key(4), **kw)
    c = sample(TINY, params, ids, mask, key=jax.random.key(5), **kw)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert not np.array_equal(a["input_ids"], c["input_ids"])
    assert len({tuple(r) for r in a["response"][:3]}) > 1  # the K rollouts of one prompt differ


class PromptStream:
    def __init__(self, seed):
        self.seed = seed

    def batch_at(self, step):
        ids, mask = _prompts(self.seed * 1000 + step)
        loss = np.zeros(ids.shape, np.float32)
        loss[1, -1] = 1
        return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}


def _run(params, steps, run_dir, **kw):
    obj = TokenBuncher(cfg=TINY, k=2, max_new_tokens=4, warmup_steps=1, benign_weight=0.5, kl_coef=0.01)
    trainable, frozen = obj.init(params, jax.random.key(1))
    return train(trainable, obj.grad, {"harmful": PromptStream(0), "benign": PromptStream(1)}, optax.adamw(1e-2),
                 frozen=frozen, steps=steps, run_dir=run_dir, collect=obj.collect, log_every=1, progress=False,
                 seed=3, **kw)


@pytest.mark.slow  # ~25 s idle: two loop runs and a resume
def test_sampled_run_resumes_bit_identically(params, tmp_path):
    full = _run(params, 3, tmp_path / "full")
    _run(params, 2, tmp_path / "part")  # "killed" after step 2's checkpoint
    resumed = _run(params, 3, tmp_path / "part", resume=True)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert [r["token_noiser"] for r in a] == [0.0, 1.0, 0.0] and len(resumed.history) == 1
    for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

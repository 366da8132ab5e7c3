"""Decoder maths: derivatives vs float64 finite differences, padding, LoRA, perturbations, loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense.models import forward, init_params, lm_loss, lora_init, lora_merge, named_config, token_nll

CFG = named_config("tiny")
B, T = 2, 16
fwd = jax.jit(forward, static_argnums=0, static_argnames="return_hidden")
loss_fn = jax.jit(lm_loss, static_argnums=0)
nll_fn = jax.jit(token_nll, static_argnums=0)


def _batch(cfg, key=0, pad=3):
    ids = jax.random.randint(jax.random.key(key), (B, T), 3, cfg.vocab_size)
    mask = jnp.ones((B, T), jnp.int32).at[1, :pad].set(0)
    loss_mask = mask.astype(jnp.float32).at[:, : T // 4].set(0)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def test_grad_and_hvp_match_central_differences_in_float64():
    """g·v and H v (forward-over-reverse) agree with central differences of L and of g, in float64.

    Tiny tied config with llama3 RoPE scaling: the tied embedding's gradient sums both uses.
    """
    cfg = CFG.replace(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    eps = 1e-6
    with jax.enable_x64(True):
        batch = _batch(cfg, key=4)

        @jax.jit
        def point_and_direction():
            p = jax.tree.map(lambda x: 4 * x, init_params(cfg, jax.random.key(3), jnp.float64))
            leaves, tree = jax.tree.flatten(p)
            keys = jax.random.split(jax.random.key(5), len(leaves))
            return p, jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, x.shape, x.dtype)
                                                for k, x in zip(keys, leaves)])

        def loss(p):
            return lm_loss(cfg, p, batch)

        @jax.jit
        def at(p, v, s):  # (L, g, Hv) at p + s·v
            q = jax.tree.map(lambda a, d: a + s * d, p, v)
            g, hv = jax.jvp(jax.grad(loss), (q,), (v,))
            return loss(q), g, hv

        p, v = point_and_direction()
        _, g, hv = at(p, v, 0.0)
        (l_plus, g_plus, _), (l_minus, g_minus, _) = at(p, v, eps), at(p, v, -eps)
        ad_dir = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
        dir_err = abs(float((l_plus - l_minus) / (2 * eps) - ad_dir)) / abs(float(ad_dir))
        fd_hv = jax.tree.map(lambda a, b: (a - b) / (2 * eps), g_plus, g_minus)
        err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(hv), jax.tree.leaves(fd_hv)))
        scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(hv))
        print(f"\nrel |g·v − FD| = {dir_err:.1e}, max|Hv − FD| / max|Hv| = {err / scale:.1e}")
        assert g["embed"].dtype == jnp.float64 and "lm_head" not in g
        assert dir_err <= 1e-8
        assert err <= 1e-6 * scale


def test_padding_does_not_change_real_logits(params):
    """Row 0 holds 11 tokens unpadded-at-the-end; row 1 the same tokens left-padded by 5."""
    ids = jax.random.randint(jax.random.key(1), (11,), 3, CFG.vocab_size)
    pad = jnp.zeros((5,), jnp.int32)
    right, left = jnp.concatenate([ids, pad]), jnp.concatenate([pad, ids])
    mask = jnp.stack([(jnp.arange(T) < 11), (jnp.arange(T) >= 5)]).astype(jnp.int32)
    logits = fwd(CFG, params, jnp.stack([right, left]), attention_mask=mask)
    np.testing.assert_allclose(logits[1, 5:], logits[0, :11], atol=2e-6)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_causality(params):
    ids = _batch(CFG)["input_ids"]
    changed = ids.at[:, 6].set((ids[:, 6] + 1) % CFG.vocab_size)
    a, b = fwd(CFG, params, ids), fwd(CFG, params, changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert float(jnp.abs(a[:, 6:] - b[:, 6:]).min(axis=-1).max()) > 0


def test_loss_matches_log_softmax_reference(params):
    batch = _batch(CFG)
    logits = fwd(CFG, params, batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    w = batch["loss_mask"][:, 1:]
    np.testing.assert_allclose(loss_fn(CFG, params, batch), jnp.sum(nll * w) / jnp.sum(w), rtol=1e-6)
    np.testing.assert_allclose(nll_fn(CFG, params, batch), jnp.sum(nll * w, 1) / jnp.sum(w, 1), rtol=1e-6)


def test_return_hidden_layout(params):
    batch = _batch(CFG)
    logits, hidden = fwd(CFG, params, batch["input_ids"], attention_mask=batch["attention_mask"],
                         return_hidden=True)
    assert hidden.shape == (CFG.num_layers + 1, B, T, CFG.hidden_size)
    np.testing.assert_array_equal(hidden[0], params["embed"][batch["input_ids"]])
    np.testing.assert_array_equal(logits, fwd(CFG, params, batch["input_ids"], attention_mask=batch["attention_mask"]))


def test_hidden_perturb_changes_only_downstream(params):
    """A perturbation of layer 0's output at position t changes later hidden states only at ≥ t."""
    batch = _batch(CFG)
    t = 9
    delta = jnp.zeros((CFG.num_layers, B, T, CFG.hidden_size)).at[0, :, t].set(0.5)
    kw = dict(attention_mask=batch["attention_mask"], return_hidden=True)
    base_logits, base = fwd(CFG, params, batch["input_ids"], **kw)
    logits, hidden = fwd(CFG, params, batch["input_ids"], hidden_perturb=delta, **kw)
    np.testing.assert_array_equal(hidden[:1], base[:1])
    np.testing.assert_allclose(hidden[1] - base[1], delta[0], atol=1e-6)
    np.testing.assert_array_equal(hidden[2][:, :t], base[2][:, :t])  # pad positions too: they see only themselves
    np.testing.assert_array_equal(logits[:, :t], base_logits[:, :t])
    assert float(jnp.abs(hidden[2][:, t:] - base[2][:, t:]).max()) > 1e-3
    assert float(jnp.abs(logits[:, t:] - base_logits[:, t:]).max()) > 1e-4


def test_lora_zero_b_is_identity_and_matches_merge(params):
    batch = _batch(CFG)
    lora = lora_init(CFG, jax.random.key(7), rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))
    assert lora["layers"]["w_down"]["a"].shape == (CFG.num_layers, CFG.intermediate_size, 4)
    base = fwd(CFG, params, batch["input_ids"])
    np.testing.assert_array_equal(fwd(CFG, params, batch["input_ids"], lora=lora), base)
    lora = jax.tree.map(lambda x: x, lora)
    lora["layers"] = jax.tree.map(lambda x: x + 0.05, lora["layers"])  # non-zero b
    with_lora = fwd(CFG, params, batch["input_ids"], lora=lora)
    assert float(jnp.abs(with_lora - base).max()) > 1e-3
    np.testing.assert_allclose(with_lora, fwd(CFG, lora_merge(params, lora), batch["input_ids"]), atol=1e-5)
    g = jax.jit(jax.grad(lambda ad: lm_loss(CFG, params, batch, lora=ad)))(lora)
    assert float(jnp.abs(g["layers"]["wq"]["a"]).max()) > 0


def test_bf16_params_give_float32_logits_close_to_float32(params):
    batch = _batch(CFG)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)
    l16 = fwd(CFG, p16, batch["input_ids"], attention_mask=batch["attention_mask"])
    l32 = fwd(CFG, p32, batch["input_ids"], attention_mask=batch["attention_mask"])
    assert l16.dtype == jnp.float32
    assert float(jnp.abs(l16 - l32).max()) < 0.02 * float(jnp.abs(l32).max()) + 1e-3
    assert loss_fn(CFG, p16, batch).dtype == jnp.float32


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("tied", [pytest.param(True, marks=pytest.mark.slow), False])
def test_chunked_cross_entropy_equals_whole_logits_in_value_grad_and_jvp(params, monkeypatch, tied):
    """With T·V over LOGIT_CHUNK_ELEMENTS, lm_loss / token_nll run over token chunks (here 3 chunks
    of 6 for T = 16, the last one padded): loss, per-row NLL, gradient and jvp equal the one-chunk
    values, and the loss equals log-softmax of `forward`'s logits."""
    from jaxdefense.models import decoder

    cfg = CFG if tied else CFG.replace(tie_embeddings=False)
    p = params if tied else init_params(cfg, jax.random.key(3))
    batch = _batch(cfg, key=5)
    v = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), p)

    def measure():
        loss = lambda q: lm_loss(cfg, q, batch)  # noqa: E731
        return jax.jit(lambda q: (loss(q), token_nll(cfg, q, batch), jax.grad(loss)(q),
                                  jax.jvp(loss, (q,), (v,))[1]))(p)

    whole = measure()
    monkeypatch.setattr(decoder, "LOGIT_CHUNK_ELEMENTS", cfg.vocab_size * 6)
    assert decoder.logit_chunk_tokens(T, cfg.vocab_size) == 6
    chunked = measure()
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(_flat(b), _flat(a), rtol=2e-5, atol=2e-7)
    logits = fwd(cfg, p, batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    w = batch["loss_mask"][:, 1:]
    np.testing.assert_allclose(float(chunked[0]), float(jnp.sum(nll * w) / jnp.sum(w)), rtol=1e-5)


def test_unknown_remat_policy_is_a_config_error():
    from jaxdefense.errors import ConfigError

    with pytest.raises(ConfigError, match="remat"):
        CFG.replace(remat="some")


@pytest.mark.slow
def test_remat_policies_keep_loss_and_gradient(params):
    """cfg.remat "dots-saveable" and "everything" rematerialise each scanned layer: the loss and
    gradient equal those of "none" (to float rounding)."""
    batch = _batch(CFG, key=6)
    ref = jax.jit(jax.value_and_grad(lambda q: lm_loss(CFG, q, batch)))(params)
    for policy in ("dots-saveable", "everything"):
        cfg = CFG.replace(remat=policy)
        out = jax.jit(jax.value_and_grad(lambda q: lm_loss(cfg, q, batch)))(params)
        np.testing.assert_allclose(_flat(out), _flat(ref), rtol=1e-5, atol=1e-7)



@pytest.mark.parametrize("with_grads", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_layer_ranges_chained_through_the_stream_equal_the_whole_stack(with_grads):
    """decoder_stack over [0, 1) then [1, 3) from that output (LoRA with non-zero b, per-layer
    perturbations, remat "dots-saveable", padding) gives the whole stack's output and hidden
    states, and (slow) its gradients w.r.t. params, adapters and perturbations."""
    from jaxdefense.models.decoder import decoder_stack

    cfg = CFG.replace(num_layers=3, remat="dots-saveable")
    p = init_params(cfg, jax.random.key(11))
    batch = _batch(cfg, key=12)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    lora = lora_init(cfg, jax.random.key(13), rank=2, alpha=6.0, targets=("wq", "w_up"))
    lora["layers"] = jax.tree.map(lambda x: x + 0.07, lora["layers"])  # non-zero b; a differs per layer
    perturb = 0.3 * jax.random.normal(jax.random.key(14), (3, B, T, cfg.hidden_size))
    probe = jax.random.normal(jax.random.key(15), (B, T, cfg.hidden_size))

    def whole(p, lora, perturb):
        x, hidden = decoder_stack(cfg, p, ids, attn, lora, perturb, return_hidden=True)
        return jnp.sum(x * probe), hidden

    def chained(p, lora, perturb):
        x, low = decoder_stack(cfg, p, ids, attn, lora, perturb, return_hidden=True, layers=(0, 1))
        x, high = decoder_stack(cfg, p, None, attn, lora, perturb, return_hidden=True, start_hidden=x, layers=(1, 3))
        assert low.shape[0] == 2 and high.shape[0] == 3
        return jnp.sum(x * probe), jnp.concatenate([low, high[1:]], axis=0)

    run = (lambda f: jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)) if with_grads else (lambda f: f)
    ref = jax.jit(run(whole))(p, lora, perturb)
    got = jax.jit(run(chained))(p, lora, perturb)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match=r"decoder_stack layers: \(2, 4\)"):
        decoder_stack(cfg, p, ids, attn, layers=(2, 4))

"""Reference forward passes for the representation methods' tests, written layer by layer
(no scan, no `hidden_perturb`): an explicit perturbation input per layer output, every hidden
state, and the masked token-mean CE by log-softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.models.decoder import causal_mask, decoder_layer, logits_from_hidden, positions_from_mask, rope_table


def hidden_list(cfg, params, batch, deltas=None):
    """[h_0, …, h_L]: embedding output, then each layer's output plus deltas[l] (if given)."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    rope, mask = rope_table(cfg, positions_from_mask(attn)), causal_mask(attn)
    x = params["embed"][ids]
    out = [x]
    for layer in range(cfg.num_layers):
        x, _ = decoder_layer(cfg, jax.tree.map(lambda w: w[layer], params["layers"]), x, rope, mask)
        if deltas is not None:
            x = x + deltas[layer]
        out.append(x)
    return out


def ce_of_hidden(cfg, params, batch, x):
    logits = logits_from_hidden(cfg, params, x)[:, :-1]
    logp = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    on = batch["loss_mask"][:, 1:].astype(logp.dtype)
    return -jnp.sum(picked * on) / jnp.sum(on)


def perturbed_ce(cfg, params, batch, deltas):
    """Masked token-mean CE with deltas[l] [B,T,D] added to layer l's output."""
    return ce_of_hidden(cfg, params, batch, hidden_list(cfg, params, batch, deltas)[-1])


def zero_deltas(cfg, batch, dtype):
    B, T = np.shape(batch["input_ids"])
    return [jnp.zeros((B, T, cfg.hidden_size), dtype) for _ in range(cfg.num_layers)]


def as_jnp(batches, dtype=None):
    """{stream: {field: jnp array}}, float fields cast to dtype if given."""
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x

    return {k: {f: cast(x) for f, x in v.items()} for k, v in batches.items()}


def to64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def rel_err(a, b):
    num = sum(float(jnp.sum(jnp.square(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(jnp.sum(jnp.square(y))) for y in jax.tree.leaves(b))
    return (num / den) ** 0.5


class Streams:
    """Train-loop streams renaming SyntheticSEAM's: {my_name: synthetic_name}; `batch_at(step)`."""

    def __init__(self, data, names: dict):
        self.data, self.names = data, names

    def view(self, name):
        data, source = self.data, self.names[name]

        class View:
            def batch_at(self, step):
                return data.batches(step)[source]

        return View()

    def streams(self):
        return {name: self.view(name) for name in self.names}

    def batches(self, step, held_out=False):
        raw = self.data.batches(step, held_out=held_out)
        return {name: raw[source] for name, source in self.names.items()}

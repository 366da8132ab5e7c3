"""Low-rank adapters: W' = W + s · A B with A [in, r], B [r, out], stacked on the layer axis.

lora = {"layers": {name: {"a": [L, in, r], "b": [L, r, out]}}, "scale": s}, s = alpha / r.
B starts at zero, so a fresh adapter leaves the model unchanged (PEFT's default).
The weights an adapter may target are those declared `lora` in `models.layout`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdefense.errors import ConfigError
from jaxdefense.models.layout import WEIGHTS, param_shapes

LORA_TARGETS = tuple(w.name for w in WEIGHTS if w.lora)


def lora_init(cfg, key: jax.Array, rank: int, alpha: float, targets=("wq", "wv"), dtype=jnp.float32) -> dict:
    """A ~ U(±1/√in) (PEFT's kaiming-uniform bound with a=√5), B = 0, scale = alpha / rank.

    "scale" is a float leaf of the pytree: exclude it from optimiser updates (e.g. optax.masked).
    """
    if rank < 1:
        raise ConfigError(f"lora rank: must be ≥ 1, got {rank}")
    shapes = param_shapes(cfg)["layers"]
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ConfigError(f"lora targets: unknown {unknown}; choose from {LORA_TARGETS}")
    keys = jax.random.split(key, len(targets))
    layers = {}
    for name, k in zip(targets, keys):
        L, fan_in, fan_out = shapes[name]
        bound = 1.0 / math.sqrt(fan_in)
        layers[name] = {"a": jax.random.uniform(k, (L, fan_in, rank), dtype, -bound, bound),
                        "b": jnp.zeros((L, rank, fan_out), dtype)}
    return {"layers": layers, "scale": float(alpha) / rank}


def merge_layer(p: dict, layer_lora: dict, scale) -> dict:
    """One layer's params with W + s · a @ b for each adapted weight (a [in,r], b [r,out])."""
    p = dict(p)
    for name, ab in layer_lora.items():
        delta = (ab["a"].astype(jnp.float32) @ ab["b"].astype(jnp.float32)) * scale
        p[name] = p[name] + delta.astype(p[name].dtype)
    return p


def merge(params: dict, lora: dict) -> dict:
    """Full params with every adapter folded in (stacked [L, in, out] weights), e.g. for export."""
    layers = dict(params["layers"])
    for name, ab in lora["layers"].items():
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        layers[name] = layers[name] + (delta * lora["scale"]).astype(layers[name].dtype)
    return {**params, "layers": layers}

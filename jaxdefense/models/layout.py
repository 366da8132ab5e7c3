"""The parameter layout: one declaration per weight, from which everything else is derived.

    params = {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
              "layers": {name: [L, *dims]}}      (layer weights stacked on a leading L axis)

Each `Weight` names its dimensions (ModelConfig sizes), their logical axes (the sharding rules of
`jaxdefense.train.sharding` map these to mesh axes), its initialiser, its Hugging Face and GGUF keys, whether
the HF tensor is its transpose (HF Linear weights are (out, in), ours (in, out): kernel = weightᵀ),
the config under which it exists, and whether a LoRA adapter may target it. `param_shapes`,
`param_axes`, `init_params`, the HF and GGUF maps (`models.hf`, `models.gguf`), `LORA_TARGETS` (`models.lora`) and
`train.sharding.PARAM_AXES` all read `WEIGHTS`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdefense.models.config import ModelConfig

INIT_STD = 0.02
INITS = ("normal", "ones", "zeros")
_PRESENT: dict[str, Callable[[ModelConfig], bool]] = {
    "always": lambda cfg: True,
    "qkv_bias": lambda cfg: cfg.qkv_bias,
    "qk_norm": lambda cfg: cfg.qk_norm,
    "untied": lambda cfg: not cfg.tie_embeddings,
}


@dataclasses.dataclass(frozen=True)
class Weight:
    """One parameter.

    dims: ModelConfig attribute per dimension (after the L axis when `layer`); axes: the logical
    axis of each of those dimensions; init: "normal" (N(0, INIT_STD²)), "ones" or "zeros";
    hf: its HF tensor name, "{i}" standing for the layer index; transpose: HF holds its transpose;
    when: a key of the presence conditions ("always", "qkv_bias", "qk_norm", "untied");
    lora: a LoRA target (then dims are (in, out)); gguf: its llama.cpp GGUF tensor name (dequantised,
    a GGUF tensor has the HF tensor's shape, so `transpose` applies to it too).
    """

    name: str
    layer: bool
    dims: tuple[str, ...]
    axes: tuple[str, ...]
    init: str
    hf: str
    transpose: bool = False
    when: str = "always"
    lora: bool = False
    gguf: str = ""

    def __post_init__(self):
        if len(self.dims) != len(self.axes) or self.init not in INITS or self.when not in _PRESENT:
            raise ValueError(f"weight {self.name}: inconsistent declaration")
        if self.layer != ("{i}" in self.hf) or self.layer != ("{i}" in self.gguf) or (self.lora and (not self.layer or len(self.dims) != 2)):
            raise ValueError(f"weight {self.name}: inconsistent declaration")

    def present(self, cfg: ModelConfig) -> bool:
        return _PRESENT[self.when](cfg)

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """(num_layers, *dims) for a layer weight, else dims, as sizes of `cfg`."""
        sizes = tuple(int(getattr(cfg, d)) for d in self.dims)
        return (cfg.num_layers, *sizes) if self.layer else sizes

    @property
    def logical_axes(self) -> tuple[str, ...]:
        return ("layers", *self.axes) if self.layer else self.axes

    def hf_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Shape of one HF tensor (one layer's slice for a layer weight)."""
        shape = self.shape(cfg)[1:] if self.layer else self.shape(cfg)
        return shape[::-1] if self.transpose else shape


_ATTN, _MLP = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
_BLK = "blk.{i}."

WEIGHTS: tuple[Weight, ...] = (
    Weight("embed", False, ("vocab_size", "hidden_size"), ("vocab", "embed"), "normal", "model.embed_tokens.weight",
           gguf="token_embd.weight"),
    Weight("attn_norm", True, ("hidden_size",), ("norm",), "ones", "model.layers.{i}.input_layernorm.weight",
           gguf=_BLK + "attn_norm.weight"),
    Weight("wq", True, ("hidden_size", "q_dim"), ("embed", "heads"), "normal", _ATTN + "q_proj.weight", True,
           lora=True, gguf=_BLK + "attn_q.weight"),
    Weight("wk", True, ("hidden_size", "kv_dim"), ("embed", "kv_heads"), "normal", _ATTN + "k_proj.weight", True,
           lora=True, gguf=_BLK + "attn_k.weight"),
    Weight("wv", True, ("hidden_size", "kv_dim"), ("embed", "kv_heads"), "normal", _ATTN + "v_proj.weight", True,
           lora=True, gguf=_BLK + "attn_v.weight"),
    Weight("bq", True, ("q_dim",), ("heads",), "zeros", _ATTN + "q_proj.bias", when="qkv_bias",
           gguf=_BLK + "attn_q.bias"),
    Weight("bk", True, ("kv_dim",), ("kv_heads",), "zeros", _ATTN + "k_proj.bias", when="qkv_bias",
           gguf=_BLK + "attn_k.bias"),
    Weight("bv", True, ("kv_dim",), ("kv_heads",), "zeros", _ATTN + "v_proj.bias", when="qkv_bias",
           gguf=_BLK + "attn_v.bias"),
    Weight("q_norm", True, ("head_dim",), ("norm",), "ones", _ATTN + "q_norm.weight", when="qk_norm",
           gguf=_BLK + "attn_q_norm.weight"),
    Weight("k_norm", True, ("head_dim",), ("norm",), "ones", _ATTN + "k_norm.weight", when="qk_norm",
           gguf=_BLK + "attn_k_norm.weight"),
    Weight("wo", True, ("q_dim", "hidden_size"), ("heads", "embed"), "normal", _ATTN + "o_proj.weight", True,
           lora=True, gguf=_BLK + "attn_output.weight"),
    Weight("mlp_norm", True, ("hidden_size",), ("norm",), "ones", "model.layers.{i}.post_attention_layernorm.weight",
           gguf=_BLK + "ffn_norm.weight"),
    Weight("w_gate", True, ("hidden_size", "intermediate_size"), ("embed", "mlp"), "normal",
           _MLP + "gate_proj.weight", True, lora=True, gguf=_BLK + "ffn_gate.weight"),
    Weight("w_up", True, ("hidden_size", "intermediate_size"), ("embed", "mlp"), "normal", _MLP + "up_proj.weight",
           True, lora=True, gguf=_BLK + "ffn_up.weight"),
    Weight("w_down", True, ("intermediate_size", "hidden_size"), ("mlp", "embed"), "normal",
           _MLP + "down_proj.weight", True, lora=True, gguf=_BLK + "ffn_down.weight"),
    Weight("final_norm", False, ("hidden_size",), ("norm",), "ones", "model.norm.weight", gguf="output_norm.weight"),
    Weight("lm_head", False, ("hidden_size", "vocab_size"), ("embed", "vocab"), "normal", "lm_head.weight", True,
           when="untied", gguf="output.weight"),
)
BY_NAME: dict[str, Weight] = {w.name: w for w in WEIGHTS}


def weights(cfg: ModelConfig) -> tuple[Weight, ...]:
    """The weights present under `cfg`, in declaration order."""
    return tuple(w for w in WEIGHTS if w.present(cfg))


def param_tree(cfg: ModelConfig, leaf: Callable[[Weight], Any]) -> dict:
    """The params nesting of `cfg` with `leaf(w)` at each weight w."""
    tree: dict = {"layers": {}}
    for w in weights(cfg):
        (tree["layers"] if w.layer else tree)[w.name] = leaf(w)
    return tree


def param_shapes(cfg: ModelConfig) -> dict:
    """Shape tuple per parameter, nested as the params pytree."""
    return param_tree(cfg, lambda w: w.shape(cfg))


def param_axes(cfg: ModelConfig) -> dict:
    """Logical-axes tuple per parameter, nested as the params pytree (tuples are the leaves:
    flatten with `is_leaf=lambda x: isinstance(x, tuple)`)."""
    return param_tree(cfg, lambda w: w.logical_axes)


def _init_leaf(w: Weight, shape, key, dtype):
    if w.init == "ones":
        return jnp.ones(shape, dtype)
    if w.init == "zeros":
        return jnp.zeros(shape, dtype)
    return (INIT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """W ~ N(0, INIT_STD²) (HF initializer_range) drawn in float32, norm scales 1, biases 0.

    `key` is split into one subkey per leaf in the pytree's flattening order (sorted names);
    subkeys of "ones"/"zeros" leaves go unused.
    """
    specs, treedef = jax.tree.flatten(param_tree(cfg, lambda w: w), is_leaf=lambda x: isinstance(x, Weight))
    keys = jax.random.split(key, len(specs))
    return jax.tree.unflatten(treedef, [_init_leaf(w, w.shape(cfg), k, dtype) for w, k in zip(specs, keys)])

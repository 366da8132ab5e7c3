"""Decoder configuration and the strict mapping to and from Hugging Face config.json.

One `ModelConfig` covers Llama 2, Llama 3/3.1/3.2, Qwen2/2.5 and Qwen3:
  llama : no biases; RoPE "default" or "llama3" (3.1/3.2 frequency scaling)
  qwen2 : llama + q/k/v biases (no o bias)
  qwen3 : llama + per-head RMSNorm of q and k over head_dim before RoPE

`config_from_hf` follows penzai's converter: known-harmless keys are allowlisted, keys
the port implements are read, keys whose non-default value would change the math are
checked against that default, and any other key raises `CheckpointError` naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxdefense.errors import CheckpointError, ConfigError

FAMILIES = ("llama", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
LLAMA3_ROPE_KEYS = ("factor", "high_freq_factor", "low_freq_factor", "original_max_position_embeddings")
REMAT_POLICIES = ("none", "dots-saveable", "everything")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one decoder; frozen and hashable, so usable as a jit static argument.

    `rope_scaling` is None (plain RoPE) or a sorted tuple of (key, value) pairs of the
    "llama3" scaling (a dict is accepted and frozen). `eos_token_id` is an int, a tuple of
    ints (several stop ids, as in Llama 3 instruct) or None. `remat` is the per-layer
    rematerialisation inside the layer scan (not an HF field): "none" keeps every activation
    for the backward pass, "dots-saveable" keeps the outputs of the weight matmuls and recomputes
    the rest (attention scores included), "everything" keeps only each layer's input.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    family: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    remat: str = "none"

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.family not in FAMILIES:
            raise ConfigError(f"model family: {self.family!r} is not one of {FAMILIES}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model remat: {self.remat!r} is not one of {REMAT_POLICIES}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            if scaling.get("rope_type") != "llama3" or set(scaling) != {"rope_type", *LLAMA3_ROPE_KEYS}:
                raise ConfigError(f"rope_scaling: expected llama3 keys {LLAMA3_ROPE_KEYS}, got {sorted(scaling)}")

    @property
    def q_dim(self) -> int:
        """Width of the concatenated query heads, num_heads · head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the concatenated key (or value) heads, num_kv_heads · head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids as a tuple (empty when none)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _llama3_scaling(factor, low, high, original):
    return {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": float(low),
            "high_freq_factor": float(high), "original_max_position_embeddings": int(original)}


_NAMED = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_embeddings=True,
                 max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny-qwen2": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, tie_embeddings=True, qkv_bias=True, family="qwen2",
                       max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny-qwen3": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, tie_embeddings=True, qk_norm=True, family="qwen3",
                       max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                  num_kv_heads=2, head_dim=32, tie_embeddings=False, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Shapes of public checkpoints (weights not included), for cost studies on accelerators.
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=_llama3_scaling(32.0, 1.0, 4.0, 8192), tie_embeddings=True,
                        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
                         tie_embeddings=True, qkv_bias=True, family="qwen2", max_position_embeddings=32768,
                         bos_token_id=151643, eos_token_id=151643),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, tie_embeddings=True,
                       qk_norm=True, family="qwen3", max_position_embeddings=40960,
                       bos_token_id=151643, eos_token_id=151645),
}


def named_config(name: str, **overrides) -> ModelConfig:
    """A built-in config by name ("tiny", "tiny-qwen2", "tiny-qwen3", "small", "llama3.2-1b",
    "qwen2.5-0.5b", "qwen3-0.6b"), with optional field overrides."""
    if name not in _NAMED:
        raise ConfigError(f"model config name: unknown {name!r}; known: {sorted(_NAMED)}")
    return ModelConfig(**{**_NAMED[name], **overrides})


# ---------------------------------------------------------------- Hugging Face config.json

_HARMLESS = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "initializer_range", "pretraining_tp", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "tokenizer_class", "max_window_layers", "_attn_implementation",
    "_attn_implementation_autoset", "chunk_size_feed_forward", "problem_type", "torchscript",
    # token ids the forward pass never reads (bos/eos/pad are kept in ModelConfig for generation)
    "unk_token_id", "sep_token_id", "cls_token_id", "mask_token_id", "decoder_start_token_id",
    "_commit_hash", "finetuning_task", "task_specific_params", "prefix",
}
# key -> value the port assumes; any other value changes the math and is rejected.
_MUST_EQUAL = {
    "hidden_act": "silu", "mlp_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
    "partial_rotary_factor": 1.0, "sliding_window": None, "use_mrope": False, "rope_scaling": None,
    "is_encoder_decoder": False,
}
_READ = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "rope_parameters", "rope_theta", "rope_scaling", "attention_bias", "layer_types", "bos_token_id",
    "eos_token_id", "pad_token_id",
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _rope_from_hf(hf: dict) -> tuple[float, tuple | None]:
    """(rope_theta, rope_scaling) from `rope_parameters` (transformers 5) or legacy keys."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    if params is not None and legacy is not None:
        raise CheckpointError("config.json: both rope_parameters and legacy rope_scaling are set")
    params = dict(params if params is not None else (legacy or {}))
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"config.json rope_parameters: per-layer-type RoPE {sorted(params)} is not supported")
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if float(params.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("config.json rope_parameters.partial_rotary_factor: only 1.0 is supported")
    if rope_type == "default":
        params.pop("original_max_position_embeddings", None)
        if params:
            raise CheckpointError(f"config.json rope_parameters: unsupported keys {sorted(params)} "
                                  "for rope_type default")
        return float(theta), None
    if rope_type != "llama3":
        raise CheckpointError(f"config.json rope_parameters.rope_type: {rope_type!r} is not supported "
                              "(supported: 'default', 'llama3')")
    params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    unknown = set(params) - set(LLAMA3_ROPE_KEYS)
    missing = set(LLAMA3_ROPE_KEYS) - set(params)
    if unknown or missing:
        raise CheckpointError(f"config.json rope_parameters: llama3 needs {LLAMA3_ROPE_KEYS}; "
                              f"unknown {sorted(unknown)}, missing {sorted(missing)}")
    return float(theta), tuple(sorted(_llama3_scaling(params["factor"], params["low_freq_factor"],
                                                       params["high_freq_factor"],
                                                       params["original_max_position_embeddings"]).items()))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict; raises CheckpointError naming any unsupported field."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"config.json model_type: {model_type!r} is not supported (supported: {FAMILIES})")
    for key in _REQUIRED:
        if key not in hf:
            raise CheckpointError(f"config.json {key}: missing")
    for key, value in hf.items():
        if key in _HARMLESS or key in _READ and key not in _MUST_EQUAL:
            continue
        if key not in _MUST_EQUAL:
            raise CheckpointError(f"config.json {key}: not implemented by the port (value {value!r})")
        if key == "sliding_window" and not hf.get("use_sliding_window", model_type == "llama"):
            continue  # Qwen configs carry a window size that is off unless use_sliding_window is set
        if key == "rope_scaling":
            continue  # read by _rope_from_hf
        if value != _MUST_EQUAL[key]:
            raise CheckpointError(f"config.json {key}: {value!r} is not supported (only {_MUST_EQUAL[key]!r})")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise CheckpointError("config.json layer_types: only full_attention is supported, "
                              f"got {sorted(set(layer_types))}")
    attention_bias = bool(hf.get("attention_bias", False))
    if attention_bias:
        raise CheckpointError(f"config.json attention_bias: true (q/k/v/o biases) is not supported for {model_type}")
    theta, scaling = _rope_from_hf(hf)
    heads = int(hf["num_attention_heads"])
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3", max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        family=model_type, bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos, pad_token_id=hf.get("pad_token_id"))


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json dict in the transformers 5 layout (rope under `rope_parameters`)."""
    expect = {"llama": (False, False), "qwen2": (True, False), "qwen3": (False, True)}[cfg.family]
    if (cfg.qkv_bias, cfg.qk_norm) != expect:
        raise CheckpointError(f"config family {cfg.family!r} cannot carry qkv_bias={cfg.qkv_bias}, "
                              f"qk_norm={cfg.qk_norm}; set family to match")
    rope = {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope.update(dict(cfg.rope_scaling))
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    hf = {
        "architectures": [ARCHITECTURES[cfg.family]], "model_type": cfg.family, "dtype": dtype,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id,
    }
    if cfg.family in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if cfg.family == "llama":
        hf["mlp_bias"] = False
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
                  layer_types=["full_attention"] * cfg.num_layers)
    return hf

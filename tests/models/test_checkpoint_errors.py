"""Strict HF import: every unsupported field or tensor mismatch is a CheckpointError naming it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxdefense.errors import CheckpointError
from jaxdefense.models import config_from_hf, config_to_hf, init_params, load_hf, named_config, save_hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny untied Qwen2 checkpoint (biases exercise extra keys), written by save_hf."""
    cfg = named_config("tiny-qwen2", tie_embeddings=False)
    params = init_params(cfg, jax.random.key(0))
    path = save_hf(cfg, params, tmp_path_factory.mktemp("ckpt") / "model")
    return cfg, params, path, load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())


def _write(tmp_path, tensors, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path


def _expect_error(path, *needles):
    with pytest.raises(CheckpointError) as info:
        load_hf(path)
    for needle in needles:
        assert needle in str(info.value)
    return str(info.value)


def test_roundtrip_is_exact(saved):
    cfg, params, path, _, _ = saved
    cfg2, params2 = load_hf(path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_missing_tensor(saved, tmp_path):
    _, _, _, tensors, config = saved
    tensors = dict(tensors)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    _expect_error(_write(tmp_path, tensors, config), "missing tensor model.layers.1.self_attn.k_proj.bias")


def test_extra_tensor(saved, tmp_path):
    _, _, _, tensors, config = saved
    tensors = {**tensors, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}
    _expect_error(_write(tmp_path, tensors, config), "unexpected tensor model.layers.0.self_attn.o_proj.bias")


def test_rotary_inv_freq_buffers_are_ignored(saved, tmp_path):
    _, params, _, tensors, config = saved
    tensors = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    _, loaded = load_hf(_write(tmp_path, tensors, config))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_misshaped_tensor(saved, tmp_path):
    _, _, _, tensors, config = saved
    tensors = {**tensors, "model.layers.0.mlp.up_proj.weight": np.zeros((175, 64), np.float32)}
    _expect_error(_write(tmp_path, tensors, config), "model.layers.0.mlp.up_proj.weight", "(175, 64)", "(176, 64)")


def test_tied_lm_head_must_equal_embedding(tmp_path):
    cfg = named_config("tiny")
    path = save_hf(cfg, init_params(cfg, jax.random.key(1)), tmp_path / "tied")
    tensors = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    config = json.loads((path / "config.json").read_text())
    for sub in ("same", "differ"):
        (tmp_path / sub).mkdir()
    same = _write(tmp_path / "same", {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, config)
    _, params = load_hf(same)
    assert "lm_head" not in params
    differ = _write(tmp_path / "differ", {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1},
                    config)
    _expect_error(differ, "lm_head.weight")


@pytest.mark.parametrize("change, needle", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
    ({"use_sliding_window": True, "sliding_window": 16}, "sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"some_new_feature": 3}, "some_new_feature"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_unsupported_config_field(saved, tmp_path, change, needle):
    _, _, _, tensors, config = saved
    message = _expect_error(_write(tmp_path, tensors, {**config, **change}), needle)
    assert "config.json" in message


@pytest.mark.parametrize("change, needle", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"sliding_window": 128}, "sliding_window"),
])
def test_unsupported_llama_field(change, needle):
    config = {**config_to_hf(named_config("tiny")), **change}
    with pytest.raises(CheckpointError, match=needle):
        config_from_hf(config)


def test_fields_outside_the_forward_pass_are_accepted(saved, tmp_path):
    """transformers' config of a GGUF load carries unk_token_id, use_cache, dtype tags, is_encoder_decoder."""
    cfg, params, _, tensors, config = saved
    harmless = {"unk_token_id": 0, "sep_token_id": None, "use_cache": False, "torch_dtype": "float32",
                "dtype": "float32", "is_encoder_decoder": False, "transformers_version": "5.24.0"}
    cfg2, params2 = load_hf(_write(tmp_path, tensors, {**config, **harmless}))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    with pytest.raises(CheckpointError, match="is_encoder_decoder"):
        config_from_hf({**config, **harmless, "is_encoder_decoder": True})
    with pytest.raises(CheckpointError, match="rope_type"):
        config_from_hf({**config, "unk_token_id": 0,
                        "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}})


def test_legacy_rope_keys_and_hub_metadata():
    """A Llama 3.2-style config.json of transformers 4 (rope_theta + rope_scaling at top level)."""
    legacy = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    }
    cfg = config_from_hf(legacy)
    assert cfg.rope_theta == 500000.0
    assert dict(cfg.rope_scaling) == {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                      "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
    assert cfg.eos_ids == (128001, 128008, 128009) and cfg.tie_embeddings
    hash(cfg)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    new = config_to_hf(cfg)
    assert "rope_theta" not in new and new["rope_parameters"]["rope_type"] == "llama3"


def test_qwen2_window_size_is_ignored_when_off():
    """Qwen2.5 hub configs carry sliding_window=131072 with use_sliding_window=false."""
    config = {**config_to_hf(named_config("tiny-qwen2")), "sliding_window": 131072, "use_sliding_window": False}
    assert config_from_hf(config).qkv_bias


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2", "tiny-qwen3", "small", "llama3.2-1b", "qwen3-0.6b"])
def test_named_configs_roundtrip(name):
    cfg = named_config(name)
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg


def test_save_hf_rejects_wrong_params_and_leaves_nothing(tmp_path):
    cfg = named_config("tiny")
    params = init_params(cfg, jax.random.key(0))
    bad = {**params, "layers": {**params["layers"], "wq": jnp.zeros((2, 64, 63))}}
    with pytest.raises(CheckpointError, match="wq"):
        save_hf(cfg, bad, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    save_hf(cfg, params, tmp_path / "out")
    save_hf(cfg, params, tmp_path / "out")  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_truncated_or_corrupt_safetensors_names_the_file(saved, tmp_path, damage):
    _, _, path, tensors, config = saved
    target = _write(tmp_path, tensors, config) / "model.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        target.write_bytes(data[:8] + b"{not json" + data[17:])
    message = _expect_error(tmp_path, str(target), "unreadable safetensors")
    assert "\n" not in message

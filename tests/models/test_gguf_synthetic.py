"""GGUF import on tiny files written with gguf.GGUFWriter (llama.cpp's layout), and the pretrained-name plumbing."""

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="needs the gguf package: pip install 'jaxdefense[smollm2]'")

from jaxdefense import config as C  # noqa: E402
from jaxdefense import pipeline  # noqa: E402
from jaxdefense.errors import CheckpointError, ConfigError  # noqa: E402
from jaxdefense.models import init_params, load_gguf, named_config  # noqa: E402
from jaxdefense.models.gguf import gguf_tensor_map  # noqa: E402
from jaxdefense.models.layout import BY_NAME  # noqa: E402


def _permute(w, heads):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rows of q_proj / k_proj)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path, cfg, params, arch, *, extra_kv=(), extra_tensors=(), drop=()):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_string("general.name", "tiny")
    for key, value in extra_kv:
        w.add_string(key, value)
    for key, (name, layer, transpose, _) in gguf_tensor_map(cfg).items():
        if key in drop:
            continue
        value = np.asarray(params[name] if layer is None else params["layers"][name][layer], np.float32)
        value = value.T if transpose else value
        if arch == "llama" and name in ("wq", "wk"):
            value = _permute(value, cfg.num_heads if name == "wq" else cfg.num_kv_heads)
        w.add_tensor(key, np.ascontiguousarray(value))
    for key, value in extra_tensors:
        w.add_tensor(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("name,tied", [("tiny", True), ("tiny", False), ("tiny-qwen2", True), ("tiny-qwen3", False)])
def test_roundtrip_unpermutes_llama_rope_rows(tmp_path, name, tied):
    cfg = named_config(name, tie_embeddings=tied, rope_theta=5e4, rms_norm_eps=2.0 ** -17)  # float32-exact
    rng = np.random.default_rng(3)  # non-trivial norms and biases, so a mix-up shows
    params = jax.tree.map(lambda p: p + rng.normal(0, 0.1, p.shape).astype(np.float32),
                          init_params(cfg, jax.random.key(3)))
    cfg2, params2 = load_gguf(_write(tmp_path / "m.gguf", cfg, params, cfg.family))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_unpermute_is_not_identity():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of dim 4
    assert not np.array_equal(_permute(w, 2), w)
    from jaxdefense.models.gguf import unpermute_rope_rows
    np.testing.assert_array_equal(unpermute_rope_rows(_permute(w, 2), 2), w)


@pytest.fixture(scope="module")
def tiny():
    cfg = named_config("tiny", rms_norm_eps=2.0 ** -17)
    return cfg, init_params(cfg, jax.random.key(0))


def test_unsupported_metadata_key_raises_naming_it(tmp_path, tiny):
    path = _write(tmp_path / "m.gguf", *tiny, "llama", extra_kv=[("llama.rope.scaling.type", "yarn")])
    with pytest.raises(CheckpointError, match="llama.rope.scaling.type"):
        load_gguf(path)


def test_unexpected_and_missing_tensors_raise_naming_them(tmp_path, tiny):
    extra = _write(tmp_path / "a.gguf", *tiny, "llama", extra_tensors=[("rope_freqs.weight", np.ones(8, np.float32))])
    with pytest.raises(CheckpointError, match="unexpected tensor rope_freqs.weight"):
        load_gguf(extra)
    missing = _write(tmp_path / "b.gguf", *tiny, "llama", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match="missing tensor blk.1.ffn_up.weight"):
        load_gguf(missing)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")


def test_every_weight_declares_its_gguf_key():
    assert BY_NAME["wq"].gguf == "blk.{i}.attn_q.weight" and BY_NAME["embed"].gguf == "token_embd.weight"
    assert all(w.gguf for w in BY_NAME.values())


def test_gguf_path_and_pretrained_name_in_configs(tmp_path, tiny, monkeypatch):
    path = _write(tmp_path / "m.gguf", *tiny, "llama")
    assert pipeline.model_dir(path) == path
    cfg, _ = pipeline.build_model(C.ModelSection(path=str(path)), seed=0)
    assert cfg == tiny[0]
    section = C.ModelSection(name="smollm2-135m-instruct")
    assert (section.name, section.path) == (None, "smollm2-135m-instruct")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"pip install 'jaxdefense\[smollm2\]'"):
        pipeline.model_dir("smollm2-135m-instruct")

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


def test_read_gguf_metadata_equals_gguf_reader(tmp_path):
    """Every value type of the header parses as gguf.GGUFReader reads it; a cut header raises naming the file."""
    from jaxdefense.models.gguf import read_gguf_metadata

    path = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -123456)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2 ** 40 + 3)
    w.add_int64("t.i64", -(2 ** 40))
    w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "naïve ☃ Ġx")
    w.add_array("t.ints", [3, 1, 4, 1, 5])
    w.add_array("t.floats", [0.5, -2.25])
    w.add_array("t.strs", ["<|im_start|>", "Ġ t", ""])
    w.add_tensor("token_embd.weight", np.ones((2, 3), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = read_gguf_metadata(path)
    reference = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == reference.keys() and ours["t.str"] == "naïve ☃ Ġx" and ours["t.strs"][1] == "Ġ t"
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value) if "f" in key.split(".")[-1] else ours[key] == value, key
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.gguf: truncated GGUF header"):
        read_gguf_metadata(cut)
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(40))
    with pytest.raises(CheckpointError, match="x.gguf: not a GGUF file"):
        read_gguf_metadata(tmp_path / "x.gguf")


def test_tokenizer_from_gguf_tiny_vocabulary():
    """A byte-level BPE from metadata alone: merges in rank order, control tokens whole and special,
    user-defined tokens whole, add_bos_token in the post-processor, and an unsupported model named."""
    from jaxdefense.models.tokenizer import tokenizer_from_gguf

    tokens = ["<s>", "</s>", "<think>", "a", "b", "c", "Ġ", "ab", "Ġab", "abc", "bc"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3, 4] + [1] * 8,
            "tokenizer.ggml.merges": ["a b", "Ġ ab", "ab c", "b c"],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"}
    tok = tokenizer_from_gguf(meta)
    ids = tok("abc ab<think>bc</s>")["input_ids"]
    # "abc" → ab+c → abc (rank 2) — not a+bc: "a b" outranks "b c"; " ab" → Ġab
    assert ids == [0, 9, 8, 2, 10, 1]
    assert tok.decode(ids, skip_special_tokens=True) == "abc ab<think>bc"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", None)
    assert tok.apply_chat_template([{"role": "user", "content": "cab"}], tokenize=False) == "<s>cab</s>"
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model 'llama'"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "llama"}, "m.gguf")
    with pytest.raises(CheckpointError, match=r"merges\[1\]"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.merges": ["a b", "abc"]})


def test_read_gguf_tensors_equal_gguf_reader_bytes(tmp_path):
    """Tensor infos and data offsets (after the alignment padding) as gguf.GGUFReader finds them, for F32, F16
    and a Q8_0 tensor; a tensor cut off by the end of the file raises naming it."""
    from gguf.quants import quantize

    from jaxdefense.models.gguf import read_gguf_tensors

    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.normal(size=(3, 5)).astype(np.float32), "b.weight": rng.normal(size=7).astype(np.float16)}
    q8 = quantize(rng.normal(size=(2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "x" * 13)  # an odd header length, so the data start needs padding
    for name, value in arrays.items():
        w.add_tensor(name, value)
    w.add_tensor("c.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta, tensors = read_gguf_tensors(path)
    assert meta["general.name"] == "x" * 13 and set(tensors) == {"a.weight", "b.weight", "c.weight"}
    for t in gguf.GGUFReader(str(path)).tensors:
        kind, shape, raw = tensors[t.name]
        assert kind == int(t.tensor_type) and shape == tuple(int(d) for d in reversed(t.shape))
        np.testing.assert_array_equal(gguf.dequantize(raw, t.tensor_type), gguf.dequantize(t.data, t.tensor_type))
    np.testing.assert_array_equal(gguf.dequantize(tensors["a.weight"][2], gguf.GGMLQuantizationType.F32),
                                  arrays["a.weight"])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-60])  # into c.weight (136 bytes), past the end padding
    with pytest.raises(CheckpointError, match="tensor c.weight runs past the end"):
        read_gguf_tensors(cut)

"""GGUF (llama.cpp) checkpoints: metadata → ModelConfig, dequantised tensors → params, tokenizer.

`load_gguf(path, dtype)` parses the file's header itself (`read_gguf_tensors`: key-value metadata
and tensor infos over one memmap; `gguf.GGUFReader` builds a numpy view per metadata element,
seconds for a 49k-token vocabulary), dequantises every tensor to float32 on the host with the
`gguf` package (`gguf.dequantize`: Q4_0/1, Q8_0, K-quants, F16, ...; no torch) and casts to `dtype`. A dequantised GGUF tensor has the HF tensor's shape (ggml lists dims innermost first), so
the names and transposes come from `layout.WEIGHTS` (`Weight.gguf`, `Weight.transpose`).

llama.cpp's converter permutes the rows of q_proj and k_proj for the "llama" architecture, so
that ggml's interleaved RoPE (pairs 2i, 2i+1) computes HF's rotate-half RoPE (pairs i, i+Dh/2):
    W_gguf = W_hf.reshape(H, 2, Dh/2, D).swapaxes(1, 2).reshape(H·Dh, D)
(H = num_heads for q, num_kv_heads for k). Loading inverts it, as transformers' GGUF loader
does. "qwen2"/"qwen3" files use ggml's NEOX RoPE (rotate-half) and are not permuted.

Strict like `load_hf`: an unsupported architecture, an architecture metadata key the port does
not implement (RoPE scaling, sliding window, experts, ...), a missing, unexpected (e.g. llama
3.1's `rope_freqs.weight`) or mis-shaped tensor raise CheckpointError naming it.
`general.*`, `tokenizer.*` and `quantize.*` metadata change nothing in the forward pass.

The tokenizer (tokenizer.ggml.* and tokenizer.chat_template) needs no torch either:
`read_gguf_metadata` parses only the file's key-value header (no tensor views) and
`models.tokenizer.tokenizer_from_gguf` builds a byte-level BPE ("gpt2": SmolLM2, Llama 3, Qwen)
with the `tokenizers` library. Other tokenizer models (sentencepiece "llama", "t5", ...) go
through transformers' own GGUF conversion, whose reader imports torch.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.errors import CheckpointError
from jaxdefense.models.config import ModelConfig
from jaxdefense.models.layout import param_shapes, weights

ARCHITECTURES = ("llama", "qwen2", "qwen3")  # GGUF general.architecture, named as our families
ROPE_PERMUTED = {"llama": {"wq": "num_heads", "wk": "num_kv_heads"}}  # architecture → weight → heads of the permutation
_ARCH_KEYS = {  # {arch}.<key> → ModelConfig field (None: checked against the head size)
    "block_count": "num_layers", "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_heads", "attention.head_count_kv": "num_kv_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings", "vocab_size": "vocab_size",
    "rope.dimension_count": None, "attention.key_length": None, "attention.value_length": None,
}
_HARMLESS_PREFIXES = ("general.", "tokenizer.", "quantize.", "GGUF.")
_TOKEN_IDS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
              "pad_token_id": "tokenizer.ggml.padding_token_id"}


# GGUF value types (gguf.GGUFValueType): id → struct format of a scalar; 8 string, 9 array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path) -> dict:
    """Every key-value pair of a GGUF file's header (v2/v3, little-endian), tensors untouched.

    Values are Python ints/floats/bools/strs, arrays are lists. Unlike `gguf.GGUFReader`, no
    per-element numpy views are built, so the 49k-entry token and merge lists parse in well under a second.
    """
    path = _checked_file(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse_header(data, path)[0]


def _checked_file(path) -> Path:
    """`path` as a Path; CheckpointError if it is missing or too short to hold a GGUF header."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file does not exist")
    if path.stat().st_size < 24:
        raise CheckpointError(f"{path}: not a GGUF file ({path.stat().st_size} bytes)")
    return path


def read_gguf_tensors(path) -> tuple[dict, dict]:
    """(metadata, {name: (GGML type id, HF-order shape, raw uint8 array)}) of a GGUF file.

    The raw arrays are views of one read-only memmap, shaped as `gguf.dequantize` takes them
    (rows of bytes: `gguf.quants.quant_shape_to_byte_shape`).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = _checked_file(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        meta, infos, start = _parse_header(data, path, tensors=True)
    raw = np.memmap(path, np.uint8, mode="r")
    tensors = {}
    for name, dims, kind, offset in infos:
        try:
            qtype = GGMLQuantizationType(kind)
            block, size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: tensor {name}: unknown GGML type {kind}") from err
        shape = tuple(reversed(dims))  # ggml lists dims innermost first
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name} appears twice")
        if shape and shape[-1] % block:
            raise CheckpointError(f"{path}: tensor {name}: row size {shape[-1]} is not a multiple of the "
                                  f"{qtype.name} block size {block}")
        row_bytes = (shape[-1] // block * size) if shape else size
        n_bytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
        begin = start + offset
        if begin + n_bytes > raw.size:
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file")
        tensors[name] = (kind, shape, raw[begin:begin + n_bytes].reshape(*shape[:-1], row_bytes))
    return meta, tensors


def _parse_header(data, path: Path, tensors: bool = False):
    """(metadata, end offset) of the key-value header; with tensors, (metadata, tensor infos
    [(name, dims, type, offset)], absolute start of the tensor data)."""
    if len(data) < 24 or data[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (magic {bytes(data[:4])!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2, 3; big-endian files are not)")
    pos = 24

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CheckpointError(f"{path}: truncated GGUF header")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    def string() -> str:
        nonlocal pos
        (n,) = take("<Q")
        if pos + n > len(data):
            raise CheckpointError(f"{path}: truncated GGUF header")
        pos += n
        return data[pos - n:pos].decode("utf-8", errors="replace")

    def value(kind: int):
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            item, n = take("<IQ")
            if item in _SCALAR_FORMATS:
                return list(take(f"<{n}{_SCALAR_FORMATS[item]}"))
            return [value(item) for _ in range(n)]
        if kind not in _SCALAR_FORMATS:
            raise CheckpointError(f"{path}: GGUF metadata value type {kind} is unknown")
        return take("<" + _SCALAR_FORMATS[kind])[0]

    meta = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = take("<I")
        meta[key] = value(kind)
    if not tensors:
        return meta, pos
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = take("<I")
        dims = take(f"<{n_dims}Q")
        kind, offset = take("<IQ")
        infos.append((name, tuple(int(d) for d in dims), int(kind), int(offset)))
    align = int(meta.get("general.alignment", 32))
    return meta, infos, -(-pos // align) * align


def config_from_gguf(meta: dict, tensor_shapes: dict[str, tuple], path="GGUF") -> ModelConfig:
    """ModelConfig from GGUF metadata (and the tensor list: tied embeddings, vocab size)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: general.architecture {arch!r} is not supported "
                              f"(supported: {ARCHITECTURES})")
    prefix = arch + "."
    values = {}
    for key, value in meta.items():
        if key.startswith(_HARMLESS_PREFIXES):
            continue
        sub = key[len(prefix):] if key.startswith(prefix) else None
        if sub not in _ARCH_KEYS:
            raise CheckpointError(f"{path}: GGUF metadata {key}: not implemented by the port (value {value!r})")
        if isinstance(value, list):
            raise CheckpointError(f"{path}: GGUF metadata {key}: per-layer values {value!r} are not supported")
        values[sub] = value
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if key not in values:
            raise CheckpointError(f"{path}: GGUF metadata {prefix}{key}: missing")
    fields = {f: values[k] for k, f in _ARCH_KEYS.items() if f is not None and k in values}
    heads = int(fields["num_heads"])
    fields.setdefault("num_kv_heads", heads)
    head_dim = int(values.get("attention.key_length", int(fields["hidden_size"]) // heads))
    for key in ("attention.value_length", "rope.dimension_count"):
        if key in values and int(values[key]) != head_dim:
            raise CheckpointError(f"{path}: GGUF metadata {prefix}{key}: {values[key]} != head size {head_dim} "
                                  "(partial RoPE / different value size) is not supported")
    if "token_embd.weight" not in tensor_shapes:
        raise CheckpointError(f"{path}: missing tensor token_embd.weight")
    fields.setdefault("vocab_size", tensor_shapes["token_embd.weight"][0])
    fields = {f: float(v) if f in ("rms_norm_eps", "rope_theta") else int(v) for f, v in fields.items()}
    ids = {f: int(meta[k]) for f, k in _TOKEN_IDS.items() if k in meta}
    return ModelConfig(**fields, **ids, head_dim=head_dim, tie_embeddings="output.weight" not in tensor_shapes,
                       qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", family=arch)


def gguf_tensor_map(cfg: ModelConfig) -> dict[str, tuple[str, int | None, bool, tuple]]:
    """GGUF tensor name → (our param name, layer index or None, transpose, dequantised shape)."""
    out = {}
    for w in weights(cfg):
        for i in range(cfg.num_layers) if w.layer else (None,):
            out[w.gguf.format(i=i)] = (w.name, i, w.transpose, w.hf_shape(cfg))
    return out


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (module docstring) along axis 0."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_gguf(path, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a GGUF file, every tensor dequantised through `gguf` and cast to `dtype`."""
    try:
        import gguf
    except ImportError as err:
        raise CheckpointError(f"{path}: reading GGUF needs the gguf package: pip install gguf "
                              "(or pip install 'jaxdefense[smollm2]')") from err

    path = Path(path)
    meta, tensors = read_gguf_tensors(path)
    shapes = {name: shape for name, (_, shape, _) in tensors.items()}
    cfg = config_from_gguf(meta, shapes, path)
    expected = gguf_tensor_map(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)"
                                                                       if len(missing) > 1 else ""))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} (not implemented by the port)")
    for key, (_, _, _, want) in expected.items():
        if shapes[key] != tuple(want):
            raise CheckpointError(f"{path}: tensor {key} has shape {shapes[key]}, expected {tuple(want)}")
    permuted = ROPE_PERMUTED.get(cfg.family, {})
    np_dtype = np.dtype(jnp.dtype(dtype))
    host = {"layers": {n: np.empty(s, np_dtype) for n, s in param_shapes(cfg)["layers"].items()}}
    for key, (name, layer, transpose, want) in expected.items():
        kind, _, raw = tensors[key]
        qtype = gguf.GGMLQuantizationType(kind)
        try:
            value = np.asarray(gguf.dequantize(raw, qtype), np.float32).reshape(want)
        except (NotImplementedError, ValueError) as err:
            raise CheckpointError(f"{path}: tensor {key}: cannot dequantise {qtype.name} ({err})") from err
        if name in permuted:
            value = unpermute_rope_rows(value, getattr(cfg, permuted[name]))
        value = value.T if transpose else value
        if layer is None:
            host[name] = np.asarray(value, np_dtype)
        else:
            host["layers"][name][layer] = value
    return cfg, jax.tree.map(jnp.asarray, host)

"""Hugging Face checkpoint import/export (config.json + safetensors, single file or sharded).

The key map (HF name, transpose, shape of every tensor) is derived from `models.layout`:
HF Linear weights are (out, in), ours (in, out), so kernel = weightᵀ; layers are stacked on
the leading L axis. Tied embeddings stay ONE array (no lm_head key).
Loading is strict: every expected tensor present with its exact shape, no unknown
tensor, no unsupported config field, a readable safetensors file — else CheckpointError
naming the key or file, with nothing returned. Saving writes to a temporary sibling directory and renames it into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxdefense.errors import CheckpointError
from jaxdefense.models.config import ModelConfig, config_from_hf, config_to_hf
from jaxdefense.models.layout import BY_NAME, param_shapes, weights

_HARMLESS_TENSOR = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_EMBED_KEY, _HEAD_KEY = BY_NAME["embed"].hf, BY_NAME["lm_head"].hf


def hf_tensor_map(cfg: ModelConfig) -> dict[str, tuple[str, int | None, bool, tuple]]:
    """HF key → (our param name, layer index or None, transpose, HF shape), from `layout.WEIGHTS`."""
    out = {}
    for w in weights(cfg):
        for i in range(cfg.num_layers) if w.layer else (None,):
            out[w.hf.format(i=i)] = (w.name, i, w.transpose, w.hf_shape(cfg))
    return out


@contextlib.contextmanager
def _open(file: Path):
    """safe_open(file) as a context in which an unreadable, truncated or corrupt file (at open or
    at a tensor read) raises CheckpointError naming it."""
    try:
        with safe_open(str(file), framework="numpy") as handle:
            yield handle
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from err


def _weight_files(path: Path) -> dict[str, tuple[Path, tuple]]:
    """HF key → (safetensors file holding it, shape); model.safetensors, else the sharded index."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        files, listed = [single], None
    elif index.exists():
        listed = json.loads(index.read_text()).get("weight_map")
        if not isinstance(listed, dict):
            raise CheckpointError(f"{index}: no weight_map")
        files = [path / f for f in sorted(set(listed.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: shard {f.name} is missing")
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    key_file = {}
    for f in files:
        with _open(f) as handle:
            for key in handle.keys():
                key_file[key] = (f, tuple(handle.get_slice(key).get_shape()))
    for key in listed or {}:
        if key not in key_file:
            raise CheckpointError(f"{path}: missing tensor {key} (listed in the index, absent from its shard)")
    return key_file


def _more(keys: list) -> str:
    return f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""


def load_hf(path, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a local HF directory, streamed tensor by tensor into `dtype`."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    cfg = config_from_hf(json.loads(config_file.read_text()))
    expected = hf_tensor_map(cfg)
    key_file = _weight_files(path)
    missing = sorted(set(expected) - set(key_file))
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}{_more(missing)}")
    tied_head = cfg.tie_embeddings and _HEAD_KEY in key_file
    extra = sorted(k for k in set(key_file) - set(expected) if not _HARMLESS_TENSOR.search(k)
                   and not (tied_head and k == _HEAD_KEY))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]}{_more(extra)}")
    for key, (_, _, _, hf_shape) in expected.items():
        if key_file[key][1] != hf_shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {key_file[key][1]}, expected {hf_shape}")

    np_dtype = np.dtype(jnp.dtype(dtype))
    shapes = param_shapes(cfg)
    host = {"layers": {n: np.empty(s, np_dtype) for n, s in shapes["layers"].items()}}
    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(key_file[key][0], []).append(key)
    if tied_head:
        by_file.setdefault(key_file[_HEAD_KEY][0], []).append(_HEAD_KEY)
    tied_weight = None
    for file, keys in by_file.items():
        with _open(file) as handle:
            for key in keys:
                if key == _HEAD_KEY and tied_head:
                    tied_weight = handle.get_tensor(key)
                    continue
                name, layer, transpose, _ = expected[key]
                value = handle.get_tensor(key)
                value = value.T if transpose else value
                if layer is None:
                    host[name] = np.asarray(value, np_dtype)
                else:
                    host["layers"][name][layer] = value
    if tied_weight is not None and not np.array_equal(np.asarray(tied_weight, np_dtype), host["embed"]):
        raise CheckpointError(f"{path}: tensor {_HEAD_KEY} differs from {_EMBED_KEY} "
                              "although tie_word_embeddings is true")
    return cfg, jax.tree.map(jnp.asarray, host)


def _check_params(cfg: ModelConfig, params: dict) -> None:
    shapes = param_shapes(cfg)
    want = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda s: isinstance(s, tuple))[0]}
    have = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    for key in sorted(set(want) | set(have)):
        if key not in have:
            raise CheckpointError(f"params{key}: missing (config {cfg.family}, tie_embeddings={cfg.tie_embeddings})")
        if key not in want:
            raise CheckpointError(f"params{key}: not part of the {cfg.family} layout")
        if have[key] != tuple(want[key]):
            raise CheckpointError(f"params{key}: shape {have[key]}, expected {tuple(want[key])}")


def save_hf(cfg: ModelConfig, params: dict, path, *, tokenizer=None) -> Path:
    """Write config.json, generation_config.json, model.safetensors (and the tokenizer, if given)
    loadable by transformers `AutoModelForCausalLM.from_pretrained` with identical logits."""
    _check_params(cfg, params)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    dtype = np.dtype(params["embed"].dtype)
    tensors = {}
    for key, (name, layer, transpose, _) in hf_tensor_map(cfg).items():
        value = np.asarray(params[name] if layer is None else params["layers"][name][layer])
        tensors[key] = np.ascontiguousarray(value.T if transpose else value)
    hf_config = config_to_hf(cfg, dtype=dtype.name)
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config[k] is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

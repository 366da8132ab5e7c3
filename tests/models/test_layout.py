"""The weight table is the single source of shapes, init, logical axes, HF keys and LoRA targets."""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxdefense.models as models_pkg
from jaxdefense.models import WEIGHTS, init_params, named_config, param_axes, param_shapes, save_hf
from jaxdefense.models.decoder import causal_mask, decoder_layer, positions_from_mask, rope_table
from jaxdefense.models.hf import hf_tensor_map
from jaxdefense.models.lora import LORA_TARGETS
from jaxdefense.train.sharding import PARAM_AXES

is_tuple = lambda x: isinstance(x, tuple)  # noqa: E731
# (config, number of HF tensors counted by hand: top-level + L · per-layer)
CONFIGS = {
    "qwen2-untied": (named_config("tiny-qwen2", tie_embeddings=False), 3 + 2 * (2 + 7 + 3)),
    "qwen3": (named_config("tiny-qwen3"), 2 + 2 * (2 + 7 + 2)),
    "llama": (named_config("tiny"), 2 + 2 * (2 + 7)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    cfg, n_tensors = CONFIGS[request.param]
    params = init_params(cfg, jax.random.key(0))
    path = save_hf(cfg, params, tmp_path_factory.mktemp(request.param) / "ckpt")
    return cfg, n_tensors, params, load_file(str(path / "model.safetensors"))


def test_hf_map_is_exactly_what_save_hf_writes(saved):
    cfg, n_tensors, params, tensors = saved
    mapping = hf_tensor_map(cfg)
    assert len(mapping) == len(tensors) == n_tensors
    assert set(mapping) == set(tensors)
    for key, (_, _, _, hf_shape) in mapping.items():
        assert tensors[key].shape == hf_shape, key
    up = tensors["model.layers.1.mlp.up_proj.weight"]
    assert up.shape == (cfg.intermediate_size, cfg.hidden_size)
    np.testing.assert_array_equal(up, np.asarray(params["layers"]["w_up"][1]).T)
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], np.asarray(params["embed"]))
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) == cfg.qkv_bias
    assert ("model.layers.1.self_attn.k_norm.weight" in tensors) == cfg.qk_norm
    assert ("lm_head.weight" in tensors) == (not cfg.tie_embeddings)


def test_axes_and_shapes_have_the_params_tree(saved):
    cfg, _, params, _ = saved
    axes, shapes = param_axes(cfg), param_shapes(cfg)
    assert jax.tree.structure(axes, is_leaf=is_tuple) == jax.tree.structure(params)
    assert jax.tree.structure(shapes, is_leaf=is_tuple) == jax.tree.structure(params)
    flat_axes = jax.tree.leaves(axes, is_leaf=is_tuple)
    for ax, shape, p in zip(flat_axes, jax.tree.leaves(shapes, is_leaf=is_tuple), jax.tree.leaves(params)):
        assert len(ax) == len(shape) == p.ndim and tuple(shape) == p.shape
    assert axes["layers"]["wk"] == ("layers", "embed", "kv_heads")
    assert shapes["layers"]["wk"] == (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)
    for path, ax in jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_tuple)[0]:
        assert PARAM_AXES[path[-1].key] == ax


def test_table_drives_lora_targets_and_sharding():
    assert LORA_TARGETS == ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    assert PARAM_AXES == {w.name: w.logical_axes for w in WEIGHTS}
    assert len(PARAM_AXES) == len(WEIGHTS) == 17
    assert PARAM_AXES["embed"] == ("vocab", "embed") and PARAM_AXES["w_down"] == ("layers", "mlp", "embed")


def test_init_values_and_key_order():
    """N(0, 0.02²) weights, unit norm scales, zero biases; subkey i of split(key, #leaves) feeds the
    i-th leaf in sorted-path order (the checkpoint-reproducibility contract)."""
    cfg = named_config("tiny-qwen3", qk_norm=False, qkv_bias=True, family="qwen2", tie_embeddings=False)
    params = init_params(cfg, jax.random.key(5))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert paths == sorted(paths) and len(paths) == 3 + 12
    keys = jax.random.split(jax.random.key(5), len(paths))
    i = paths.index("['layers']['w_up']")
    np.testing.assert_allclose(params["layers"]["w_up"], 0.02 * jax.random.normal(keys[i], (2, 64, 176)), rtol=1e-6)
    np.testing.assert_allclose(params["lm_head"], 0.02 * jax.random.normal(keys[-1], (64, 512)), rtol=1e-6)
    assert float(jnp.abs(params["layers"]["bq"]).max()) == 0.0
    assert float(jnp.min(params["layers"]["mlp_norm"])) == float(jnp.max(params["final_norm"])) == 1.0
    big = init_params(named_config("small"), jax.random.key(0))["embed"]
    assert abs(float(jnp.std(big)) - 0.02) < 2e-4 and abs(float(jnp.mean(big))) < 1e-4
    bf16 = init_params(cfg, jax.random.key(5), jnp.bfloat16)
    np.testing.assert_allclose(bf16["layers"]["w_up"].astype(jnp.float32), params["layers"]["w_up"], rtol=8e-3)


def test_cached_layer_equals_uncached_layer():
    """decoder_layer with a KV cache [L,B,Hk,S,Dh] (k, v written at [layer, :, :, slot:]) reproduces the
    cache-free block."""
    cfg = named_config("tiny-qwen3")
    p = jax.tree.map(lambda x: x[1], init_params(cfg, jax.random.key(1))["layers"])
    p = jax.tree.map(lambda x: 4 * x, p)
    B, T, S = 2, 6, 10
    x = jax.random.normal(jax.random.key(2), (B, T, cfg.hidden_size))
    mask = jnp.ones((B, T), jnp.int32).at[1, :2].set(0)
    rope = rope_table(cfg, positions_from_mask(mask))
    ref, (k, v) = decoder_layer(cfg, p, x, rope, causal_mask(mask))
    cache = tuple(jnp.zeros((cfg.num_layers, B, cfg.num_kv_heads, S, cfg.head_dim)) for _ in range(2))
    wide_mask = jnp.pad(causal_mask(mask), ((0, 0), (0, 0), (0, S - T)))
    out, (ck, cv) = decoder_layer(cfg, p, x, rope, wide_mask, cache, (1, 0))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_array_equal(ck[1, :, :, :T], jnp.swapaxes(k, 1, 2))
    np.testing.assert_array_equal(cv[1, :, :, :T], jnp.swapaxes(v, 1, 2))
    assert float(jnp.abs(ck[0]).max()) == float(jnp.abs(ck[1, :, :, T:]).max()) == 0.0
    # the last token alone at slot T-1, over the cache holding tokens < T-1
    last, _ = decoder_layer(cfg, p, x[:, -1:], jax.tree.map(lambda r: r[:, -1:], rope), wide_mask[:, -1:],
                            (ck.at[1, :, :, T - 1].set(0), cv.at[1, :, :, T - 1].set(0)), (1, T - 1))
    np.testing.assert_allclose(last[:, 0], ref[:, -1], atol=1e-5)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_models_imports_are_acyclic_and_never_reach_train():
    """Module-level and function-level imports between jaxdefense.models modules form a DAG."""
    root = Path(models_pkg.__file__).parent
    graph = {f"jaxdefense.models.{p.stem}": {m for m in _imports(p) if m.startswith("jaxdefense.models.")}
             for p in root.glob("*.py") if p.stem != "__init__"}
    assert not any(m.startswith("jaxdefense.train") for p in root.glob("*.py") for m in _imports(p))
    assert "jaxdefense.models.decoder" not in graph["jaxdefense.models.lora"]
    assert "jaxdefense.models.layout" in graph["jaxdefense.models.lora"]
    done, active = set(), []

    def visit(mod):
        assert mod not in active, f"import cycle: {' -> '.join(active + [mod])}"
        if mod in done:
            return
        active.append(mod)
        for dep in graph.get(mod, ()):
            visit(dep)
        active.pop()
        done.add(mod)

    for mod in graph:
        visit(mod)
    assert len(done) == len(graph) >= 7

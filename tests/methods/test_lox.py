"""LoX: the full-rank seed form with α = 1 and the official form with coef = 0 return the aligned weights,
rank-k extrapolation matches numpy's SVD matrix by matrix, and `immunize --method lox` on two HF
checkpoints trains nothing and writes an HF directory that transformers loads with equal logits."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense.errors import ConfigError
from jaxdefense.methods.lox import LoX, extrapolate
from jaxdefense.models import forward, init_params, load_hf, load_tokenizer, named_config, save_hf

CFG = named_config("tiny")
REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "jaxdefense" / "assets" / "base"
LOX_TINY = str(REPO / "jaxdefense" / "configs" / "lox_tiny.yaml")


def _aligned(base, key, scale=0.02):
    """base + a perturbation of every leaf (rank-deficient for the matrices: rank ≤ 4 per matrix)."""
    leaves, tree = jax.tree.flatten(base)
    keys = jax.random.split(key, 2 * len(leaves))
    out = []
    for i, x in enumerate(leaves):
        if x.ndim >= 2:
            a = jax.random.normal(keys[2 * i], (*x.shape[:-1], 4))
            b = jax.random.normal(keys[2 * i + 1], (*x.shape[:-2], 4, x.shape[-1]))
            out.append(x + scale * (a @ b) / 4 + 0.1 * scale * jax.random.normal(keys[2 * i], x.shape))
        else:
            out.append(x + scale * jax.random.normal(keys[2 * i], x.shape))
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="module")
def pair():
    base = init_params(CFG, jax.random.key(0))
    return base, _aligned(base, jax.random.key(1))


def _assert_tree_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


def test_full_rank_seed_form_alpha_1_and_official_coef_0_return_the_aligned_weights(pair):
    base, aligned = pair
    for k in (0, 64):  # 0 = full rank; 64 ≥ every matrix's rank goes through the same path
        _assert_tree_close(extrapolate(aligned, base, k=k, alpha=1.0, form="seed"), aligned, rtol=0, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, extrapolate(aligned, base, k=3, coef=0.0), aligned)
    # at full rank the official form is the seed form with α = 1 + coef
    _assert_tree_close(extrapolate(aligned, base, coef=0.5), extrapolate(aligned, base, alpha=1.5, form="seed"),
                       rtol=0, atol=1e-6)


def _numpy_rank_k(delta, k):
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.parametrize("form", ["official", "seed"])
def test_rank_k_matches_numpy_svd_per_matrix(pair, form):
    base, aligned = pair
    k, coef, alpha = 3, 0.7, 1.3
    got = extrapolate(aligned, base, k=k, coef=coef, alpha=alpha, form=form)
    start, scale = (aligned, coef) if form == "official" else (base, alpha)
    for name in ("embed", "lm_head") if "lm_head" in aligned else ("embed",):
        want = np.asarray(start[name]) + scale * _numpy_rank_k(aligned[name] - base[name], k)
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-6)
    for name, w in aligned["layers"].items():
        for layer in range(w.shape[0]):
            if w.ndim == 3:  # HF holds the transpose; SVD_k commutes with it
                delta = np.asarray(w[layer] - base["layers"][name][layer]).T
                want = np.asarray(start["layers"][name][layer]) + scale * _numpy_rank_k(delta, k).T
            else:
                want = np.asarray(w[layer])
            np.testing.assert_allclose(got["layers"][name][layer], want, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got["final_norm"], aligned["final_norm"])


def test_lox_declares_no_training_and_checks_its_base(pair, tmp_path):
    assert LoX.trains is False and LoX().streams() == {}
    d = LoX()
    assert (d.k, d.form, d.coef) == (0, "official", 1.0)
    with pytest.raises(ConfigError, match="method.base"):
        LoX(cfg=CFG).init(pair[1], None)
    with pytest.raises(ConfigError, match="method.base"):
        LoX(cfg=CFG, base=str(BASE)).init(pair[1], None)  # the demo base is another architecture
    with pytest.raises(ConfigError, match="form"):
        LoX(form="paper")
    with pytest.raises(ConfigError, match="k: must be >= 0"):
        LoX(k=-1)


@pytest.fixture(scope="module")
def aligned_dir(tmp_path_factory):
    """An 'aligned' HF directory: the demo base with a low-rank perturbation, and its tokenizer."""
    cfg, base = load_hf(BASE)
    path = tmp_path_factory.mktemp("aligned")
    save_hf(cfg, _aligned(base, jax.random.key(2)), path, tokenizer=load_tokenizer(BASE))
    return path


@pytest.mark.slow
def test_immunize_lox_writes_an_hf_dir_transformers_loads_with_equal_logits(aligned_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxdefense.cli import main
    from jaxdefense.train import read_metrics

    out = tmp_path / "lox"
    assert main(["immunize", "--method", "lox", "--set", f"model.path={aligned_dir}", "--set", f"method.base={BASE}",
                 "--set", "method.k=2", "--set", "method.coef=0.5", "--out", str(out), "--no-progress"]) == 0
    assert read_metrics(out) == [{"step": 0, "steps": 0}]
    assert not (out / "checkpoints").exists()
    assert "name: lox" in (out / "config.yaml").read_text()
    cfg, base = load_hf(BASE)
    _, aligned = load_hf(aligned_dir)
    cfg_out, params = load_hf(out / "hf")
    assert cfg_out == cfg
    _assert_tree_close(params, extrapolate(aligned, base, k=2, coef=0.5), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(params["embed"] - aligned["embed"]).max()) > 1e-4  # it did extrapolate

    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(2, 24))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ids[mask == 0] = 0
    ours = np.asarray(forward(cfg, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits.numpy()
    assert float(np.abs(ours - ref)[mask > 0].max()) <= 1e-4
    assert (out / "hf" / "tokenizer.json").is_file()


def test_immunize_lox_refuses_lora(tmp_path, capsys):
    from jaxdefense.cli import main

    assert main(["immunize", "--method", "lox", "--set", f"model.path={BASE}", "--set", f"method.base={BASE}",
                 "--set", "lora.rank=4", "--out", str(tmp_path / "x")]) == 2
    assert "lora.rank" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

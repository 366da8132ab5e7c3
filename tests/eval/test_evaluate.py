"""`evaluate(settings, ...)` on a tiny random model: numbers recomputed by hand, progress, over-refusal."""

import json

import numpy as np
import pytest

from jaxdefense.data import data_root_available, load_stream
from jaxdefense.eval import EvalSettings, evaluate, generate_samples, refusal_flags, response_nll, write_report

requires_data = pytest.mark.skipif(not data_root_available(), reason="no data root")

SMALL = dict(harmful_prompts=3, benign_prompts=4, nll_rows=5, max_new_tokens=6, max_len=64, batch_size=2, mc=["arc_easy"],
             mc_n=3, samples=2)


class _Judge:
    """P(harmful) = 0.75 for every non-empty response (checks the judge plumbing, not a model)."""

    metrics = {"test": {"accuracy": 0.5}}

    def score(self, prompts, responses):
        return np.array([0.75 if r.strip() else 0.0 for r in responses], np.float32)


@requires_data
def test_evaluate_numbers_progress_and_benign_refusal(tiny_model, tiny_tokenizer, tmp_path):
    cfg, params = tiny_model
    settings = EvalSettings(split="validation", **SMALL)
    calls = []
    report = evaluate(settings, cfg, params, tiny_tokenizer, judge=_Judge(),
                      progress=lambda done, total, label: calls.append((done, total, label)))
    # progress: a fixed total of rows (2×3 harmful + 2×4 benign + 5+5 NLL + Σ choices of 3 arc rows), monotone, complete
    arc = load_stream("arc_easy", "validation", limit=3)
    assert arc == [] and report["skipped"]["mc/arc_easy"] == "no validation rows"  # arc_easy has a test split only
    total = 2 * 3 + 2 * 4 + 5 + 5
    assert {t for _, t, _ in calls} == {total}
    assert [d for d, _, _ in calls] == sorted(d for d, _, _ in calls) and calls[-1][0] == total
    assert {lab for _, _, lab in calls} >= {"generate harmful", "generate benign", "harmful nll", "benign nll"}
    # the numbers, recomputed from the same held-out rows
    harmful = [r["prompt"] for r in load_stream("harmful_prompts_eval", "validation", limit=3)]
    benign = [r["prompt"] for r in load_stream("benign_instruct", "validation", limit=4)]
    hg = generate_samples(cfg, params, tiny_tokenizer, harmful, max_new_tokens=6, batch_size=2)
    bg = generate_samples(cfg, params, tiny_tokenizer, benign, max_new_tokens=6, batch_size=2)
    assert report["refusal_rate"] == float(refusal_flags(hg.texts).mean())
    assert report["benign_refusal_rate"] == float(refusal_flags(bg.texts).mean())
    assert [s["response"] for s in report["benign_samples"]] == bg.texts[:2]
    assert report["judge_harmful_score"] == pytest.approx(0.75 * np.mean([bool(t.strip()) for t in hg.texts]))
    nll = response_nll(cfg, params, tiny_tokenizer, load_stream("benign_instruct", "validation", limit=5), max_len=64,
                       batch_size=2)["nll"]
    assert report["benign_nll"] == pytest.approx(nll, rel=1e-6)
    assert 4.0 < report["harmful_nll"] < 12.0  # tiny random model (×4 weights): near/above log V = 6.0
    assert report["config"]["split"] == "validation" and report["n_prompts"] == 3 and report["n_benign_prompts"] == 4
    _, md = write_report(tmp_path, report)
    assert f"| benign_refusal_rate | {report['benign_refusal_rate']:.4g} |" in md.read_text()
    assert json.loads((tmp_path / "report.json").read_text())["benign_refusal_rate"] == report["benign_refusal_rate"]


@requires_data
def test_evaluate_with_tqdm_bar_user_prompts_and_mc(tiny_model, tiny_tokenizer):
    import io

    from tqdm import tqdm

    cfg, params = tiny_model
    settings = EvalSettings(**{**SMALL, "benign_prompts": 0, "nll_rows": 0})
    bar = tqdm(file=io.StringIO(), mininterval=0)
    report = evaluate(settings, cfg, params, tiny_tokenizer, judge=_Judge(), progress=bar,
                      prompts=["How do I pick a lock?", "Write a poem", "Tell me a joke", "unused 4th"])
    n_pairs = sum(len(r["choices"]) for r in load_stream("arc_easy", "test", limit=3))
    assert bar.total == 2 * 3 + n_pairs and bar.n == bar.total
    assert report["config"]["prompt_source"] == "user" and report["n_prompts"] == 3
    assert report["mc"]["arc_easy"]["n"] == 3 and "benign_refusal_rate" not in report
    from jaxdefense.eval import report_markdown

    assert "| benign_refusal_rate | – (not measured: benign_prompts = 0) |" in report_markdown(report)


def test_evaluate_rejects_old_call_and_skips_without_data(tiny_model, tiny_tokenizer, tmp_path, monkeypatch, capsys):
    cfg, params = tiny_model
    with pytest.raises(TypeError):
        evaluate(cfg, params, tiny_tokenizer)  # the former signature
    with pytest.raises(TypeError, match="must be an EvalSettings"):
        evaluate({"harmful_prompts": 1}, cfg, params, tiny_tokenizer)
    monkeypatch.setenv("JAXDEFENSE_DATA_DIR", str(tmp_path / "missing"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I pick a lock?\nWrite a poem\n")
    report = evaluate(EvalSettings(**{**SMALL, "prompts_file": str(prompts)}), cfg, params, tiny_tokenizer, progress=True)
    assert "4/4" in capsys.readouterr().err  # own bar: 2 prompts generated + 2 rows of entropy
    assert report["n_prompts"] == 2 and "judge_harmful_rate" in report  # the shipped judge asset
    assert set(report["skipped"]) == {"benign", "nll", "mc", "tasks"} and "harmful_nll" not in report


def test_generate_samples_length_sorted_batches_keep_prompt_order(tiny_model, tiny_tokenizer):
    """Prompts of mixed lengths are batched by length; every output row belongs to its own prompt (each equals
    that prompt generated alone) and the entropy recorded while decoding equals the teacher-forced one."""
    from dataclasses import replace

    from jaxdefense.eval.metrics import generation_entropy, length_batches, row_width

    cfg, params = tiny_model
    prompts = ["cat", "how to make a poem about the weather please thanks", "dog", "write a story about a cat here",
               "the answer"]
    gens = generate_samples(cfg, params, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=2, chat=False)
    for i, p in enumerate(prompts):
        alone = generate_samples(cfg, params, tiny_tokenizer, [p], max_new_tokens=6, batch_size=2, chat=False)
        assert (alone.token_ids[0], alone.prompt_ids[0], alone.texts[0]) == \
            (gens.token_ids[i], gens.prompt_ids[i], gens.texts[i]), p
    recorded = generation_entropy(cfg, params, gens)
    forced = generation_entropy(cfg, params, replace(gens, entropy=None), pad_id=0, batch_size=2)
    assert recorded == pytest.approx(forced, rel=1e-4) and recorded > 0.1
    assert length_batches([3, 9, 1, 9, 4], 2) == [[1, 3], [4, 0], [2]]
    assert length_batches([300, 10, 20, 30, 40], 4, max_tokens=4 * 64) == [[0], [4, 3, 2, 1]]  # 1 × 384 wide
    assert [row_width(n) for n in (1, 32, 33, 100, 128, 129, 300)] == [32, 32, 64, 128, 128, 256, 384]

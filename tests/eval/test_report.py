"""Prompt files, report writers and plots."""

import json

import pytest

from jaxdefense.errors import DataError
from jaxdefense.eval.prompts import load_prompt_file
from jaxdefense.eval.report import comparison_markdown, plot_comparison, plot_curves, plot_metrics, write_report


def test_prompt_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p1", "x": 1}\n\n{"prompt": " p2 "}\n')
    (tmp_path / "b.csv").write_text('Behavior,Category\n"multi\nline",x\nsecond,y\n')
    (tmp_path / "c.csv").write_text("id,goal,target\n1,g1,t\n2,g2,t\n")
    (tmp_path / "d.json").write_text('["q1", {"instruction": "q2"}]')
    (tmp_path / "e.txt").write_text("one\n\ntwo\n")
    (tmp_path / "f.tsv").write_text("prompt\tlabel\nt1\t0\n")
    assert load_prompt_file(tmp_path / "a.jsonl") == ["p1", "p2"]
    assert load_prompt_file(tmp_path / "b.csv") == ["multi\nline", "second"]
    assert load_prompt_file(tmp_path / "c.csv") == ["g1", "g2"]
    assert load_prompt_file(tmp_path / "d.json") == ["q1", "q2"]
    assert load_prompt_file(tmp_path / "e.txt") == ["one", "two"]
    assert load_prompt_file(tmp_path / "f.tsv") == ["t1"]


@pytest.mark.parametrize("name,content,match", [
    ("bad.csv", "id,answer\n1,2\n", r"bad\.csv.*no prompt field.*found id, answer"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"bad\.jsonl:2: not valid JSON"),
    ("bad2.jsonl", '{"text2": "x"}\n', r"bad2\.jsonl: line 1 has no prompt field"),
    ("bad.json", '{"prompt": "x"}', r"bad\.json: expected a JSON list"),
    ("bad.xml", "<x/>", r"bad\.xml: unknown prompt file type"),
    ("empty.csv", "prompt\n\n", r"empty\.csv: no prompts"),
])
def test_bad_prompt_files_name_the_file(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=match):
        load_prompt_file(tmp_path / name)
    with pytest.raises(DataError, match="does not exist"):
        load_prompt_file(tmp_path / "missing.jsonl")


def test_write_report_and_plots(tmp_path):
    report = {"refusal_rate": 0.25, "judge_harmful_rate": float("nan"), "harmful_nll": 2.5, "n_prompts": 4,
              "mc": {"arc_easy": {"acc": 0.5, "acc_norm": 0.25, "n": 4, "chance": 0.25}},
              "samples": [{"prompt": "a|b", "response": "x\ny", "refusal": False, "p_harmful": 0.1}], "skipped": {}}
    json_path, md_path = write_report(tmp_path, report)
    loaded = json.loads(json_path.read_text())
    assert loaded["judge_harmful_rate"] is None and loaded["refusal_rate"] == 0.25
    md = md_path.read_text()
    assert "| refusal_rate | 0.25 |" in md and "| mc/arc_easy acc (acc_norm) | 0.5 (0.25)" in md and "a\\|b" in md
    table = comparison_markdown({"sft": report, "seam": {"refusal_rate": 0.9}})
    assert table.splitlines()[2].startswith("| sft | 0.25") and "| seam | 0.9 |" in table
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 3.0}\n{"step": 1, "loss": 2.0, "lr": 0.1}\n')
    for png in (plot_curves({"a": ([0, 1, 2], [1.0, float("nan"), 0.5])}, tmp_path / "c.png", ylabel="loss"),
                plot_metrics(tmp_path / "metrics.jsonl", ["loss", "lr"], tmp_path / "m.png"),
                plot_comparison({"sft": report, "seam": {"refusal_rate": 0.9}}, ["refusal_rate", "harmful_nll"],
                                tmp_path / "b.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

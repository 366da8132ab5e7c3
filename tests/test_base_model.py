"""The embedded base model (jaxdefense/assets/base) and `jaxdefense build-base`."""

import json
import math

import numpy as np
import pytest

from jaxdefense import cli
from jaxdefense.base_model import (ASSET_DIR, MAX_ASSET_BYTES, AlignConfig, BaseBuildConfig, CorpusConfig, ModelSpec,
                                   PhaseConfig, build_base, phase_config, phase_objective, pretraining_texts)
from jaxdefense.eval.settings import EvalSettings
from jaxdefense.config import load_config, to_dict
from jaxdefense.data import data_root_available

needs_data = pytest.mark.skipif(not data_root_available(), reason="no data root (../shared/data or $JAXDEFENSE_DATA_DIR)")
needs_asset = pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(),
                                 reason="jaxdefense/assets/base not built (jaxdefense build-base)")


@needs_asset
def test_committed_base_is_small_and_documented():
    size = sum(p.stat().st_size for p in ASSET_DIR.iterdir() if p.is_file())
    assert size < MAX_ASSET_BYTES
    info = json.loads((ASSET_DIR / "build_info.json").read_text())
    for key in ("benign_nll", "harmful_nll", "refusal_rate", "judge_harmful_rate", "uniform_nll"):
        assert math.isfinite(info["eval"][key]), key
    slots = info["pretrain"]["steps"] * info["build_config"]["pretrain"]["batch_size"] * info["build_config"]["seq_len"]
    assert 0.8 * slots < info["pretrain"]["tokens_seen"] <= slots  # packed rows: little padding
    assert info["wall_time_s"]["total_s"] > 0 and info["versions"]["jax"]


@needs_asset
@needs_data
def test_committed_base_loads_and_predicts_benign_text():
    """Held-out benign response NLL is far below the uniform-vocabulary NLL log V."""
    from jaxdefense.data import load_stream
    from jaxdefense.eval import response_nll
    from jaxdefense.models import load_hf, load_tokenizer

    cfg, params = load_hf(ASSET_DIR)
    tokenizer = load_tokenizer(ASSET_DIR)
    assert len(tokenizer) == cfg.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
    records = load_stream("benign_instruct", "test", limit=32)
    nll = response_nll(cfg, params, tokenizer, records, max_len=128, batch_size=8)["nll"]
    assert nll < math.log(cfg.vocab_size) - 2.5, nll


@needs_asset
@needs_data
def test_committed_base_refuses_harmful_more_than_benign():
    from jaxdefense.data import load_stream
    from jaxdefense.eval import generate_samples, refusal_rate
    from jaxdefense.models import load_hf, load_tokenizer

    cfg, params = load_hf(ASSET_DIR)
    tokenizer = load_tokenizer(ASSET_DIR)
    harmful = [r["prompt"] for r in load_stream("harmful_prompts_eval", "test", limit=16)]
    benign = [r["prompt"] for r in load_stream("benign_instruct", "test", limit=16)]
    gen = generate_samples(cfg, params, tokenizer, harmful + benign, max_new_tokens=16, batch_size=16)
    assert refusal_rate(gen.texts[:16]) >= refusal_rate(gen.texts[16:]) + 0.3


def tiny_build() -> BaseBuildConfig:
    return BaseBuildConfig(
        seq_len=32, tokenizer_max_texts=400,
        model=ModelSpec(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=16, max_position_embeddings=64),
        corpus=CorpusConfig(benign_repeats=1, benign_limit=120, gsm8k_limit=40, sst2_limit=40, ag_news_limit=40,
                            hh_chosen=True),
        pretrain=PhaseConfig(steps=3, batch_size=8, lr=3e-3, warmup_steps=1),
        align=PhaseConfig(steps=2, batch_size=8, lr=1e-3, warmup_steps=1),
        alignment=AlignConfig(benign_limit=40),
        eval=EvalSettings(nll_rows=8, harmful_prompts=8, benign_prompts=8, max_new_tokens=8, batch_size=8,
                          max_len=32, mc=[], tasks=[]))


def test_phases_are_pipeline_runs_with_the_one_optimiser():
    cfg = tiny_build()
    pre, align = phase_config(cfg, "pretrain"), phase_config(cfg, "align")
    o = pre.optimizer
    assert (o.name, o.lr, o.schedule, o.warmup_steps, o.final_lr_fraction, o.b1, o.b2, o.weight_decay, o.clip) == (
        "adamw", 3e-3, "cosine", 1, 0.1, 0.9, 0.95, 0.1, 1.0)
    assert (pre.data.template, pre.data.streams["train"].options, pre.data.max_len, pre.steps) == ("raw", {"pack": True}, 32, 3)
    assert (align.data.template, align.seed, align.optimizer.lr) == ("chat", cfg.seed + 1, 1e-3)
    assert phase_objective(cfg, "pretrain").first_token_weight == 0
    assert phase_objective(cfg, "align").first_token_weight == cfg.alignment.first_token_weight == 5.0


@needs_data
@pytest.mark.slow
def test_build_base_is_deterministic(tmp_path):
    """Two builds of one config give byte-identical tokenizers and weights (and the weights moved)."""
    from safetensors.numpy import load_file

    from jaxdefense.models import init_params, load_hf

    infos = [build_base(tiny_build(), tmp_path / name, evaluate=False, log=lambda *_: None) for name in "ab"]
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in "ab")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    assert infos[0]["pretrain"]["loss_history"] == infos[1]["pretrain"]["loss_history"]
    cfg, params = load_hf(tmp_path / "a")
    import jax

    fresh = init_params(cfg, jax.random.key(0))
    assert not np.allclose(np.asarray(params["embed"]), np.asarray(fresh["embed"]))


@needs_data
def test_pretraining_corpus_is_benign_and_train_only():
    from jaxdefense.data import hash_split, load_stream
    from jaxdefense.data.sources import _split_hh_dialogue

    texts = pretraining_texts(CorpusConfig(benign_repeats=1, benign_limit=50, gsm8k_limit=5, sst2_limit=5,
                                           ag_news_limit=5, hh_chosen=True))
    assert {s for s, _ in texts} == {"benign_instruct", "hh_rlhf_chosen", "gsm8k", "sst2", "ag_news"}
    harmful = {r["response"].strip() for r in load_stream("harmful_qa", "all")}
    assert not any(t.strip() in harmful for _, t in texts)
    head, tail = "### Instruction:\n", "\n\n### Response:\n"
    prompts = [t[len(head):t.index(tail)] for s, t in texts if s == "benign_instruct"]
    assert len(prompts) == 50 and all(hash_split(p) == "train" for p in prompts)
    dialogues = [t for s, t in texts if s == "hh_rlhf_chosen"]
    assert dialogues and all(hash_split(_split_hh_dialogue("\n\n" + t)[0]) == "train" for t in dialogues)


def test_yaml_config_equals_builtin_defaults():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
    assert to_dict(load_config(path, BaseBuildConfig)) == to_dict(BaseBuildConfig())


@pytest.mark.parametrize("argv", [
    ["build-base", "--set", "model.width=3"],
    ["build-base", "--set", "pretrain.steps=0"],
    ["build-base", "--set", "align.lr=-1"],
    ["build-base", "--set", "eval.harmful_prompts=-3"],
    ["build-base", "--minutes", "0"],
    ["build-base", "--data-dir", "/nonexistent/data/root"],
])
def test_build_base_bad_arguments_exit_2_with_one_line(argv, capsys, tmp_path):
    assert cli.main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "x").exists()

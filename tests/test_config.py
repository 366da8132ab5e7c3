"""The config engine and the one run schema: defaults, ranges, registry-typed sections, errors naming the key."""

import dataclasses

import pytest
import yaml

from jaxdefense import config as C
from jaxdefense.errors import ConfigError
from jaxdefense.pipeline import RunConfig

BASE = {"model": {"name": "tiny"}, "data": {"tokenizer": "bpe:512"}, "method": {"name": "seam"}}


def _load(tmp_path, data, *sets):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return C.load_config(path, RunConfig, list(sets))


def test_defaults_overrides_and_round_trip(tmp_path):
    cfg = _load(tmp_path, BASE, "optimizer.lr=3e-4", "mesh.fsdp=4", "compute_dtype=bfloat16",
                "data.streams.benign.options.pack=true", "data.streams.adversarial.limit=7", "optimizer.clip=null",
                "method.beta=0.3", "method.estimator=exact")
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.mesh == C.MeshSection(data=1, fsdp=4, tensor=1)
    assert cfg.compute_dtype == "bfloat16" and cfg.optimizer.clip is None
    assert cfg.data.streams["benign"].options == {"pack": True}
    assert cfg.data.streams["adversarial"].limit == 7 and cfg.data.streams["adversarial"].batch_size is None
    assert (cfg.method.name, cfg.method.beta, cfg.method.estimator, cfg.method.alpha) == ("seam", 0.3, "exact", 1.0)
    assert cfg.model.name == "tiny" and cfg.steps == 100
    again = C.from_dict(RunConfig, yaml.safe_load(yaml.safe_dump(C.to_dict(cfg))))
    assert again == cfg
    assert C.to_dict(cfg)["method"]["name"] == "seam"
    assert C.diff_keys(C.to_dict(cfg), C.to_dict(dataclasses.replace(cfg, steps=5))) == ["steps"]


def test_partial_nested_section_keeps_the_parent_default():
    @dataclasses.dataclass
    class Outer:
        optimizer: C.OptimizerSection = C.field(C.OptimizerSection(lr=2e-5, schedule="cosine", clip=None,
                                                                   weight_decay=0.01))

    got = C.from_dict(Outer, {"optimizer": {"lr": 1e-3}}).optimizer
    assert (got.lr, got.schedule, got.clip, got.weight_decay) == (1e-3, "cosine", None, 0.01)
    assert C.from_dict(Outer, {}).optimizer.lr == 2e-5


def test_load_config_merges_file_over_base_section_by_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optimizer": {"lr": 0.5}, "model": {"name": "tiny"}}))
    base = {"optimizer": {"name": "sgd", "schedule": "linear", "clip": None}, "attack": {"name": "harmful_sft"}}
    cfg = C.load_config(path, RunConfig, ["attack.limit=12"], base=base)
    assert (cfg.optimizer.name, cfg.optimizer.schedule, cfg.optimizer.lr, cfg.optimizer.clip) == ("sgd", "linear", 0.5, None)
    assert cfg.attack.name == "harmful_sft" and cfg.attack.limit == 12 and cfg.attack.half == "attacker"


@pytest.mark.parametrize("sets, message", [
    (["optimizer.betas=1"], "optimizer.betas: unknown key"),
    (["mesh.fsdp=2.5"], "mesh.fsdp: expected int"),
    (["steps=true"], "steps: expected int"),
    (["optimizer.lr=fast"], "optimizer.lr: expected float"),
    (["optimizer.schedule=exp"], "optimizer.schedule: 'exp' is not one of"),
    (["data.streams.benign.batch_size=[1]"], "data.streams.benign.batch_size: expected int"),
    (["model.path=/some/dir"], "model: give exactly one"),
    (["model.name=null"], "model: give exactly one"),
    (["steps=0"], "steps: must be >= 1, got 0"),
    (["optimizer.lr=-1"], "optimizer.lr: must be > 0, got -1"),
    (["optimizer.b2=1"], "optimizer.b2: must be < 1, got 1"),
    (["data.batch_size=0"], "data.batch_size: must be >= 1"),
    (["data.streams.benign.limit=0"], "data.streams.benign.limit: must be >= 1"),
    (["lora.rank=-2"], "lora.rank: must be >= 0"),
    (["eval.harmful_prompts=-1"], "eval.harmful_prompts: must be >= 0"),
    (["method.beta=-0.5"], "method.beta: must be >= 0, got -0.5"),
    (["method.eps=0"], "method.eps: must be > 0"),
    (["method.estimator=backward"], "method.estimator: 'backward' is not one of"),
    (["method.bogus=1"], "method.bogus: unknown key"),
    (["method.name=nonesuch"], "method.name: unknown method 'nonesuch'"),
    (["attack.name=seam"], "attack.name: unknown attack 'seam'"),
    (["attack.limit=3"], r"attack.name: required \(known: benign_sft, .*harmful_sft"),
    (["data.streams=3"], "data.streams: expected a mapping"),
    (["steps.x=1"], "steps: expected int"),
    (["optimizer.lr=1", "optimizer.lr.x=1"], "optimizer.lr: is not a mapping"),
    (["noequals"], "expected key=value"),
])
def test_errors_name_the_key(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[") if "\\" not in message else message):
        _load(tmp_path, BASE, *sets)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml.*does not exist"):
        C.load_config(tmp_path / "missing.yaml", RunConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        C.load_config(bad, RunConfig)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        C.load_config(bad, RunConfig)
    assert C.parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert C.parse_override("x=.inf")[1] == float("inf") and C.parse_override("x=null")[1] is None


def test_shipped_configs_load():
    from pathlib import Path

    import jaxdefense

    root = Path(jaxdefense.__file__).parent / "configs"
    for name in ("seam_tiny", "seam_official", "sft_tiny", "sft_small"):
        cfg = C.load_config(root / f"{name}.yaml", RunConfig)
        assert cfg.method is not None, name
    official = C.load_config(root / "seam_official.yaml", RunConfig)
    o, m = official.optimizer, official.method
    assert (o.name, o.lr, o.schedule, o.clip, o.warmup_steps / official.steps) == ("adamw", 2e-5, "cosine", None, 0.1)
    assert (m.beta, m.eps, m.alpha, m.estimator) == (0.01, 1e-3, 1.0, "forward")

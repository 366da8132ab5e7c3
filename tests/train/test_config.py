import dataclasses
from typing import Any

import optax
import pytest
import yaml

from jaxdefense import config as C
from jaxdefense.errors import ConfigError
from jaxdefense.train.run import make_optimizer


def _load(tmp_path, data, *sets):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return C.load_config(path, C.RunConfig, list(sets))


BASE = {"data": {"tokenizer": "bpe:512", "streams": {"train": {"source": "benign_instruct"}}}}


def test_defaults_overrides_and_round_trip(tmp_path):
    cfg = _load(tmp_path, BASE, "optimizer.lr=3e-4", "mesh.fsdp=4", "compute_dtype=bfloat16",
                "data.streams.train.options.pack=true", "data.streams.extra.source=refusal", "optimizer.clip=null")
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.mesh == C.MeshSection(data=1, fsdp=4, tensor=1)
    assert cfg.compute_dtype == "bfloat16" and cfg.optimizer.clip is None
    assert cfg.data.streams["train"].options == {"pack": True}
    assert cfg.data.streams["extra"].batch_size == 8  # defaults fill new entries
    assert cfg.model.name == "tiny" and cfg.steps == 100
    again = C.from_dict(C.RunConfig, yaml.safe_load(yaml.safe_dump(C.to_dict(cfg))))
    assert again == cfg
    assert C.diff_keys(C.to_dict(cfg), C.to_dict(dataclasses.replace(cfg, steps=5))) == ["steps"]


@pytest.mark.parametrize("sets, message", [
    (["optimizer.betas=1"], "optimizer.betas: unknown key"),
    (["mesh.fsdp=2.5"], "mesh.fsdp: expected int"),
    (["steps=true"], "steps: expected int"),
    (["optimizer.lr=fast"], "optimizer.lr: expected float"),
    (["optimizer.schedule=exp"], "optimizer.schedule: 'exp' is not one of"),
    (["data.streams.train.batch_size=[1]"], "data.streams.train.batch_size: expected int"),
    (["data.streams.x.split=train"], "data.streams.x.source: required key is missing"),
    (["model.name=tiny", "model.path=/some/dir"], "model: give exactly one"),
    (["model.name=null"], "model: give exactly one"),
    (["steps=-1"], "steps: must be >= 0"),
    (["data.streams=3"], "data.streams: expected a mapping"),
    (["steps.x=1"], "steps: expected int"),
    (["optimizer.lr=1", "optimizer.lr.x=1"], "optimizer.lr: is not a mapping"),
    (["noequals"], "expected key=value"),
])
def test_errors_name_the_key(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _load(tmp_path, BASE, *sets)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml.*does not exist"):
        C.load_config(tmp_path / "missing.yaml", C.RunConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        C.load_config(bad, C.RunConfig)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        C.load_config(bad, C.RunConfig)


def test_schema_extension_by_subclassing(tmp_path):
    @dataclasses.dataclass
    class ImmunizeConfig(C.RunConfig):
        method: dict[str, Any] = C.field({"name": "seam"})
        alpha: float = C.field(0.5)

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "alpha": 1}))
    cfg = C.load_config(path, ImmunizeConfig, ["method.eps=1e-3"])
    assert cfg.alpha == 1.0 and cfg.method == {"eps": 1e-3}  # a dict value replaces the default
    assert C.load_config(path, ImmunizeConfig).method == {"name": "seam"}
    assert C.parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert C.parse_override("x=.inf")[1] == float("inf") and C.parse_override("x=null")[1] is None


def test_make_optimizer_schedules():
    sec = C.OptimizerSection(name="sgd", lr=1.0, schedule="linear", warmup_steps=2, clip=None)
    opt = make_optimizer(sec, steps=6)
    import jax.numpy as jnp

    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    lrs = []
    for _ in range(6):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(updates["w"]))
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ConfigError, match="optimizer.weight_decay"):
        make_optimizer(C.OptimizerSection(name="adam", weight_decay=0.1), 10)
    assert isinstance(make_optimizer(C.OptimizerSection(), 10), optax.GradientTransformation)

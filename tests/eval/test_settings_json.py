"""EvalSettings (one settings class, config metadata) and the one JSON cleaner."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxdefense.config import from_dict
from jaxdefense.errors import ConfigError
from jaxdefense.eval.settings import EvalSettings, monitor_settings
from jaxdefense.jsonutil import to_jsonable


def test_to_jsonable_cleans_numpy_jax_nonfinite_tuples_and_keys():
    import jax.numpy as jnp

    @dataclasses.dataclass
    class D:
        a: tuple = (1, 2)

    x = {1: np.float32(0.5), "nan": float("nan"), "inf": np.float64("inf"), "arr": np.array([[1, 2], [3, 4]], np.int64),
         "jax": jnp.array([1.5, jnp.nan]), "j0": jnp.float32(2.0), "t": (np.int32(3), np.bool_(True)),
         "d": D(), "p": Path("/tmp/x"), "s": {3, 1}}
    out = to_jsonable(x)
    assert out == {"1": 0.5, "nan": None, "inf": None, "arr": [[1, 2], [3, 4]], "jax": [1.5, None], "j0": 2.0,
                   "t": [3, True], "d": {"a": [1, 2]}, "p": "/tmp/x", "s": [1, 3]}
    assert type(out["arr"][0][0]) is int and type(out["j0"]) is float and type(out["t"][1]) is bool
    json.dumps(out, allow_nan=False)  # valid strict JSON
    from jaxdefense.eval.report import _jsonable
    from jaxdefense.train.metrics import to_json_value

    assert _jsonable is to_jsonable and to_json_value is to_jsonable  # one cleaner, old names kept
    assert to_jsonable(np.float32(math.pi)) == pytest.approx(math.pi, rel=1e-6)


def test_eval_settings_defaults_ranges_and_choices():
    s = EvalSettings()
    assert (s.harmful_prompts, s.benign_prompts, s.nll_rows, s.split) == (64, 64, 64, "test")
    assert (s.max_new_tokens, s.max_len, s.batch_size, s.mc, s.mc_n) == (64, 256, 8, ["arc_easy"], 100)
    loaded = from_dict(EvalSettings, {"split": "validation", "mc": [], "tasks": ["sst2"], "hf_judge_label": "1"})
    assert loaded.split == "validation" and loaded.tasks == ["sst2"] and loaded.judge_label() == 1
    for data, match in (({"batch_size": 0}, r"eval\.batch_size: must be >= 1, got 0"),
                        ({"max_new_tokens": 0}, r"eval\.max_new_tokens: must be >= 1"),
                        ({"harmful_prompts": -1}, r"eval\.harmful_prompts: must be >= 0"),
                        ({"split": "train"}, r"eval\.split: 'train' is not one of"),
                        ({"mc": ["nope"]}, r"mc: 'nope' is not one of"),
                        ({"bogus": 1}, r"bogus")):
        with pytest.raises(ConfigError, match=match):
            from_dict(EvalSettings, data, "eval")
    with pytest.raises(ConfigError, match="every: must be >= 0"):
        EvalSettings(every=-1)  # direct construction is checked too
    with pytest.raises(ConfigError, match="has no {response}"):
        EvalSettings(hf_judge_template="{prompt}")
    m = monitor_settings(every=3)
    assert (m.split, m.nll_rows, m.harmful_prompts, m.benign_prompts, m.max_new_tokens, m.max_len, m.every,
            m.task_n, m.mc) == ("validation", 32, 8, 0, 32, 128, 3, 64, [])

"""SFT attacks: the lr sweep rescaling, their streams, and attacker data disjoint from the defender's."""

from __future__ import annotations

import pytest

from jaxdefense.attacks import OFFICIAL_LRS, SMALL_MODEL_LRS, get_attack, lr_sweep
from jaxdefense.errors import ConfigError


def test_lr_sweep_keeps_the_fraction_of_the_pretraining_lr():
    assert lr_sweep() == OFFICIAL_LRS == (2e-5, 5e-5, 8e-5, 1e-4, 2e-4)
    assert SMALL_MODEL_LRS == lr_sweep(3e-3) == (2e-4, 5e-4, 8e-4, 1e-3, 2e-3)
    assert lr_sweep(3e-4) == OFFICIAL_LRS
    with pytest.raises(ConfigError):
        lr_sweep(0.0)


def test_attack_streams_and_validation():
    harmful = get_attack("harmful_sft").streams()["train"]
    assert (harmful.source, harmful.half, harmful.limit) == ("harmful_qa", "attacker", 1000)
    benign = get_attack("benign_sft", source="gsm8k", limit=50).streams()["train"]
    assert (benign.source, benign.half, benign.limit) == ("gsm8k", "all", 50)
    with pytest.raises(ConfigError, match="attack.source: 'harmful_qa' is not one of"):
        get_attack("benign_sft", source="harmful_qa")
    with pytest.raises(ConfigError, match="attack.limit: must be >= 1"):
        get_attack("harmful_sft", limit=0)


def test_attacker_data_never_overlaps_the_defenders():
    from jaxdefense.config import DataSection
    from jaxdefense.data import data_root_available
    from jaxdefense.data.sources import normalize_text
    from jaxdefense.data.specs import load_records, resolve_streams
    from jaxdefense.methods import get_method

    if not data_root_available():
        pytest.skip("data root not available")
    attack = load_records(resolve_streams(get_attack("harmful_sft", limit=None).streams(), DataSection(), "a"))
    defence = load_records(resolve_streams(get_method("seam").streams(), DataSection(), "m"))
    a = {normalize_text(r["prompt"]) for r in attack["train"]}
    d = {normalize_text(r["prompt"]) for r in defence["adversarial"]}
    assert len(a) > 500 and len(d) > 300
    assert not a & d

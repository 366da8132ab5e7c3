"""Fine-tuning attacks, one file each; `ATTACKS` maps a name to its class, `get_attack` builds one.

An attack has the shape of a method (`jaxdefense.objective.Objective`) and registers with
`@register_attack(name)`; LoRA wraps any of them (`objective.LoRA`, config section `lora:`).
"""

from jaxdefense.attacks.sft import (
    ACCURACY_TASKS,
    BENIGN_TASKS,
    OFFICIAL_LRS,
    SMALL_MODEL_LRS,
    BenignSFT,
    HarmfulSFT,
    lr_sweep,
)
from jaxdefense.methods.base import build
from jaxdefense.registry import ATTACKS, register_attack


def get_attack(name: str, cfg=None, **hparams):
    """The registered attack `name` with these hyperparameters, bound to `cfg` when given."""
    return build(ATTACKS, name, cfg, **hparams)


__all__ = ["ACCURACY_TASKS", "ATTACKS", "BENIGN_TASKS", "BenignSFT", "HarmfulSFT", "OFFICIAL_LRS",
           "SMALL_MODEL_LRS", "get_attack", "lr_sweep", "register_attack"]

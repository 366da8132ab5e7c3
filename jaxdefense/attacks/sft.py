"""Fine-tuning attacks by SFT: harmful SFT (the threat) and benign SFT (the control).

Harmful SFT trains on harmful_qa **train, attacker half** (prompt hash 0.4 ≤ u < 0.8; the
defences train on the defender half u < 0.4, see jaxdefense.data.pairs), first `limit` = 1000
records as in the official SEAM evaluation. Benign SFT trains on the train split of sst2 /
ag_news / gsm8k / benign_instruct; the attack pipeline reports the task's test accuracy before
and after (benign_instruct has no accuracy; its NLL is the utility figure). Full-parameter or
LoRA (`lora.rank`, `jaxdefense.objective.LoRA`), held-out curves from `eval.monitor`.

Learning rates: the official sweep is 2e-5, 5e-5, 8e-5, 1e-4, 2e-4 on Llama-2-7B (pre-trained
at peak lr 3e-4), i.e. 1/15 … 2/3 of the pre-training peak. `lr_sweep(pretrain_lr)` keeps those
fractions for a model pre-trained at another peak: the project's base models (jaxdefense
build-base) pre-train at 3e-3, giving 2e-4, 5e-4, 8e-4, 1e-3, 2e-3 (`SMALL_MODEL_LRS`).
"""

from __future__ import annotations

import dataclasses

from jaxdefense.config import HALVES, field
from jaxdefense.errors import ConfigError
from jaxdefense.methods.sft import SFT
from jaxdefense.objective import Objective
from jaxdefense.registry import register_attack

BENIGN_TASKS = ("benign_instruct", "sst2", "ag_news", "gsm8k")
ACCURACY_TASKS = ("sst2", "ag_news", "gsm8k")

OFFICIAL_LRS = (2e-5, 5e-5, 8e-5, 1e-4, 2e-4)
OFFICIAL_PRETRAIN_LR = 3e-4  # Llama-2 7B peak pre-training lr
OFFICIAL_HARMFUL_SAMPLES = 1000


def lr_sweep(pretrain_lr: float | None = None) -> tuple[float, ...]:
    """The official attack lrs, rescaled by pretrain_lr / 3e-4 (same fraction of the pre-training peak)."""
    if pretrain_lr is None:
        return OFFICIAL_LRS
    if not pretrain_lr > 0:
        raise ConfigError(f"pretrain_lr: must be > 0, got {pretrain_lr}")
    return tuple(float(f"{lr * pretrain_lr / OFFICIAL_PRETRAIN_LR:.3g}") for lr in OFFICIAL_LRS)


SMALL_MODEL_LRS = lr_sweep(3e-3)


@dataclasses.dataclass(frozen=True)
class HarmfulData(Objective):
    """The attacker's data: harmful prompt + answer records, attacker half of the train split (disjoint
    from the defences' defender half), the first `limit` (official: 1000)."""

    source: str = field("harmful_qa", doc="harmful prompt + answer stream")
    half: str = field("attacker", choices=HALVES)
    limit: int | None = field(OFFICIAL_HARMFUL_SAMPLES, ge=1, doc="training records (official: 1000)")

    @property
    def task(self) -> str:
        return self.source


@register_attack("harmful_sft")
@dataclasses.dataclass(frozen=True)
class HarmfulSFT(HarmfulData, SFT):
    """SFT on harmful prompt → harmful answer (`HarmfulData`'s records)."""


@register_attack("benign_sft")
@dataclasses.dataclass(frozen=True)
class BenignSFT(SFT):
    """SFT on a benign task's train split (the control: utility should survive the defence)."""

    source: str = field("benign_instruct", choices=BENIGN_TASKS, doc="the benign task")

    @property
    def task(self) -> str:
        return self.source

"""Fine-tuning attacks: harmful/benign SFT (full or LoRA) with evaluation curves, lr sweeps."""

from jaxdefense.attacks.sft import (
    BENIGN_TASKS,
    KINDS,
    OFFICIAL_LRS,
    SMALL_MODEL_LRS,
    AttackMonitor,
    AttackResult,
    EvalSettings,
    LoraSFTGrad,
    attack_records,
    benign_sft,
    harmful_sft,
    lora_optimizer,
    lora_params,
    lr_sweep,
    merged_params,
    run_sft_attack,
)

__all__ = [
    "BENIGN_TASKS", "KINDS", "OFFICIAL_LRS", "SMALL_MODEL_LRS", "AttackMonitor", "AttackResult", "EvalSettings",
    "LoraSFTGrad", "attack_records", "benign_sft", "harmful_sft", "lora_optimizer", "lora_params", "lr_sweep",
    "merged_params", "run_sft_attack",
]

"""Harmful RL: GRPO (Shao et al. 2024) with a harmfulness reward on the attacker's harmful
prompts — the attack TokenBuncher is built against (seed 000, Space 4; official attack
`configs/attack_obj1_grpo.sh`, docs/research/anchors-methods.md §4).

    r(q, y)  = P(harmful | q, y)                      the judge's score of the decoded response
    A        = group-normalised r over the K rollouts of q
    L(θ)     = token-mean of max(−A·ρ, −A·clip(ρ, 1±c)) + β·k3-KL(π_θ ‖ π_ref)

As implemented: prompts = harmful_qa train, attacker half, first `limit` (the harmful SFT
attack's rows; their answers are dropped), K = `k` rollouts each from the batched KV-cache
sampler, seeded per step; the reward is the offline harm judge (`reward="judge"`,
`eval.judge.default_judge`) or a local HF sequence classifier (`reward="hf_classifier"`,
`classifier_path`, as the official DeBERTa BeaverTails scorer); π_ref = the attacked model at
step 0 (under LoRA the frozen base). `algorithm="reinforce"`: REINFORCE with the group mean
as baseline (A = r − mean_g r, no ratio clip).

Metrics per RL step (over the step's rollouts): reward_mean, harmful_rate (judge P ≥ 0.5),
refusal_rate (`eval.refusal.is_refusal`), entropy (mean response token entropy), plus the
GRPO terms (pg_loss, kl, ratio_mean, clip_frac); the attack's held-out monitor adds benign NLL.

Where the official attack differs: its reward is a DeBERTa classifier served over Flask, its
policy Qwen2.5/Ministral 3B–8B with vLLM rollouts, lr 1e-6, 100 steps; the KL here is verl's
default k3 loss (β = 0.001), one update per rollout (no mini-batches).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxdefense.attacks.sft import HarmfulData
from jaxdefense.config import field
from jaxdefense.data.specs import StreamSpec
from jaxdefense.registry import register_attack
from jaxdefense.rl.objective import GRPOObjective
from jaxdefense.rl.rewards import harm_judge, make_reward, mean_entropy

REWARDS = ("judge", "hf_classifier")


@register_attack("harmful_grpo")
@dataclasses.dataclass(frozen=True)
class HarmfulGRPO(HarmfulData, GRPOObjective):
    """GRPO (or REINFORCE with baseline) maximising a harm judge's score on the attacker's harmful prompts.

    Hyperparameters: source, half, limit (`HarmfulData`); k, max_new_tokens, temperature, top_p,
    clip_ratio, kl_coef, kl_mode, algorithm (`rl.objective.GRPOObjective`); reward, classifier_path, harmful_label.
    """

    kl_mode: str = field("loss", choices=("loss", "reward", "none"), doc="k3 KL in the loss (verl default), in the reward, or off")
    reward: str = field("judge", choices=REWARDS, doc="judge: offline harm judge; hf_classifier: a local HF classifier")
    classifier_path: str | None = field(None, doc="reward=hf_classifier: the HF sequence-classifier directory")
    harmful_label: str = field("auto", doc="reward=hf_classifier: the harmful label (name, index or auto)")

    def streams(self) -> dict[str, StreamSpec]:
        return {"prompts": StreamSpec(self.source, half=self.half, limit=self.limit)}

    def prompt_streams(self) -> tuple[str, ...]:
        return ("prompts",)

    def build_records(self, records, model_cfg, params, tokenizer):
        """Prompts only: the responses are the rollouts."""
        return {name: [{**r, "response": ""} for r in rows] for name, rows in records.items()}, {}

    def rewards(self, prompts, responses, aux, stream_of_row):
        from jaxdefense.eval.refusal import is_refusal

        label = int(self.harmful_label) if self.harmful_label.isdigit() else self.harmful_label
        reward = make_reward(self.reward, classifier_path=self.classifier_path, harmful_label=label)
        rewards = reward(prompts, responses, aux)
        ones = np.ones(len(rewards), np.float32)
        judged = rewards if self.reward == "judge" else harm_judge().score(prompts, responses)
        stats = {"harmful_rate": ((judged >= 0.5).astype(np.float32), ones),
                 "refusal_rate": (np.array([is_refusal(r) for r in responses], np.float32), ones),
                 "entropy": (mean_entropy(aux["entropy"], aux["weights"]), ones)}
        return rewards, stats

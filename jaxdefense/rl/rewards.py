"""Rewards `reward(prompts, responses, aux) -> [B·K]` (float32 numpy) for rollouts.

prompts, responses: the decoded texts of each rollout row (None without a tokenizer); aux: the
rollout batch and its rollout pass ("entropy", "weights", "old_logp", "ref_logp" [B·K, T], ...),
all host numpy. Shipped: the offline harm judge (`eval.judge.default_judge`: P(harmful), the
attacker's reward), any local HF sequence classifier (`eval.judge.HFClassifierJudge`) and the
negated mean token entropy (TokenBuncher's reward, no text needed).
"""

from __future__ import annotations

import numpy as np

_CACHE: dict = {}


def mean_entropy(entropy, weights) -> np.ndarray:
    """[N] (1/|y|)·Σ_t H_t over each row's response positions (0 for an empty response)."""
    entropy, weights = np.asarray(entropy, np.float64), np.asarray(weights, np.float64)
    return (np.sum(entropy * weights, axis=1) / np.maximum(np.sum(weights, axis=1), 1.0)).astype(np.float32)


def entropy_reward(prompts, responses, aux) -> np.ndarray:
    """r = −(1/|y|)·Σ_t H_t (TokenBuncher's `entropyreward.py`)."""
    del prompts, responses
    return -mean_entropy(aux["entropy"], aux["weights"])


class JudgeReward:
    """P(harmful) of each response from a judge with `score(prompts, responses)`."""

    def __init__(self, judge):
        self.judge = judge

    def __call__(self, prompts, responses, aux) -> np.ndarray:
        del aux
        if responses is None:
            raise ValueError("a judge reward needs the decoded responses (objective.prepare(tokenizer))")
        return np.asarray(self.judge.score(prompts, responses), np.float32)


def harm_judge(data_dir=None):
    """The default offline `HarmJudge` (loaded once per process)."""
    key = ("judge", None if data_dir is None else str(data_dir))
    if key not in _CACHE:
        from jaxdefense.eval.judge import default_judge

        _CACHE[key] = default_judge(data_dir)
    return _CACHE[key]


def hf_classifier(path, harmful_label="auto"):
    """An `HFClassifierJudge` of a local HF sequence-classification directory (loaded once)."""
    key = ("hf", str(path), harmful_label)
    if key not in _CACHE:
        from jaxdefense.eval.judge import HFClassifierJudge

        _CACHE[key] = HFClassifierJudge(path, harmful_label=harmful_label)
    return _CACHE[key]


def make_reward(name: str, *, classifier_path=None, harmful_label="auto"):
    """"entropy" | "judge" | "hf_classifier" (needs classifier_path) → a reward function."""
    from jaxdefense.errors import ConfigError

    if name == "entropy":
        return entropy_reward
    if name == "judge":
        return JudgeReward(harm_judge())
    if name == "hf_classifier":
        if not classifier_path:
            raise ConfigError("attack.classifier_path: required for reward=hf_classifier")
        return JudgeReward(hf_classifier(classifier_path, harmful_label))
    raise ConfigError(f"reward: unknown {name!r}")

"""`GRPOObjective`: an `Objective` whose batches are rollouts made on the host before each step.

`collect` (the loop's host phase) takes the prompt streams' batches, samples K rollouts per
prompt with the current params (`rl.rollout.sample`, key fold_in(step key, 1)), runs the
rollout pass (old log-probs, entropies, and the frozen reference's log-probs), decodes the
texts when a tokenizer was given to `prepare`, scores them (`rewards`), optionally folds the
KL into the reward and computes the group advantages; `grad` then differentiates the GRPO loss
of `rl.grpo` on that fixed-shape batch (key "rollout"). Per-row statistics a subclass returns
from `rewards` (e.g. the judge's harmful flags) are logged as their means over the rows that
carry them.

The tokenizer is held out of the dataclass's hash and equality (it is a jit key).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.config import field
from jaxdefense.objective import Objective
from jaxdefense.rl.grpo import group_advantages, grpo_loss, kl_in_reward, token_logps, token_mean
from jaxdefense.rl.rollout import decode_rows, prompts_of, rollout_pass, sample

ROLLOUT = "rollout"
KL_MODES = ("loss", "reward", "none")
ALGORITHMS = ("grpo", "reinforce")
ROLLOUT_SALT = 1


@dataclasses.dataclass(frozen=True)
class GRPOObjective(Objective):
    """GRPO on rollouts of `prompt_streams()`; subclasses define the streams and `rewards`."""

    collects: ClassVar[bool] = True
    needs_text: ClassVar[bool] = True  # False: rewards read token arrays only (no decoding)

    k: int = field(4, ge=1, doc="rollouts per prompt (official TokenBuncher rollout.n = 4)")
    max_new_tokens: int = field(32, ge=1, doc="rollout length (official response length 1024)")
    temperature: float = field(1.0, gt=0, doc="sampling temperature (verl default 1.0)")
    top_p: float = field(1.0, gt=0, le=1, doc="nucleus sampling mass (verl default 1.0)")
    clip_ratio: float = field(0.2, gt=0, lt=1, doc="PPO clip c of the importance ratio (verl 0.2)")
    kl_coef: float = field(0.001, ge=0, doc="β of the KL to the frozen reference (official 0.001)")
    kl_mode: str = field("reward", choices=KL_MODES, doc="KL in the reward (official TB), k3 in the loss, or off")
    algorithm: str = field("grpo", choices=ALGORITHMS,
                           doc="grpo: std-normalised advantages + clipped ratio; reinforce: r − group mean, no clip")
    tokenizer: Any = field(None, internal=True, compare=False, hash=False, repr=False)

    def prompt_streams(self) -> tuple[str, ...]:
        raise NotImplementedError

    def rewards(self, prompts, responses, aux, stream_of_row) -> tuple[np.ndarray, dict]:
        """(rewards [N], {stat: (values [N], row weights [N])}) of the rollouts."""
        raise NotImplementedError

    def prepare(self, tokenizer):
        return dataclasses.replace(self, tokenizer=tokenizer)

    def init(self, params, key):
        del key
        return params, {"reference": params}

    def stop_tokens(self) -> tuple[int, ...]:
        stops = set(self.require_cfg().eos_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            stops.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(stops))

    def rollouts(self, params, batches, key, reference) -> tuple[dict, np.ndarray]:
        """(rollout batch with its rollout pass, stream index of each row) of the prompt streams."""
        cfg = self.require_cfg()
        parts = [prompts_of(batches[name]) for name in self.prompt_streams()]
        width = max(ids.shape[1] for ids, _ in parts)
        ids = np.concatenate([np.pad(i, ((0, 0), (0, width - i.shape[1]))) for i, _ in parts])
        mask = np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1]))) for _, m in parts])
        stream_of_row = np.repeat(np.concatenate([np.full(len(i), s) for s, (i, _) in enumerate(parts)]), self.k)
        roll = sample(cfg, params, ids, mask, k=self.k, max_new_tokens=self.max_new_tokens,
                      key=jax.random.fold_in(key, ROLLOUT_SALT), temperature=self.temperature, top_p=self.top_p,
                      stop_tokens=self.stop_tokens())
        roll.update(rollout_pass(cfg, params, reference, roll))
        return roll, stream_of_row

    def collect(self, params, batches, key, frozen) -> dict:
        """The batches with the prompt streams replaced by batches["rollout"] (module docstring)."""
        roll, stream_of_row = self.rollouts(params, batches, key, frozen["reference"])
        prompts = responses = None
        if self.tokenizer is not None and self.needs_text:
            prompt_mask = (roll["attention_mask"] > 0) & (roll["loss_mask"] == 0)
            prompts = decode_rows(self.tokenizer, roll["input_ids"], prompt_mask)
            responses = decode_rows(self.tokenizer, roll["response"], roll["attention_mask"][:, -roll["response"].shape[1]:])
        rewards, stats = self.rewards(prompts, responses, roll, stream_of_row)
        rewards = np.asarray(rewards, np.float32)
        score = rewards
        if self.kl_mode == "reward":
            score = np.asarray(kl_in_reward(rewards, roll["old_logp"], roll["ref_logp"], roll["weights"],
                                            self.kl_coef), np.float32)
        advantages = np.asarray(group_advantages(score, self.k, scale=self.algorithm == "grpo"), np.float32)
        out = {name: b for name, b in batches.items() if name not in self.prompt_streams()}
        rollout = {k: roll[k] for k in ("input_ids", "attention_mask", "loss_mask", "old_logp", "ref_logp")}
        rollout.update(advantages=advantages, rewards=rewards, stream=stream_of_row.astype(np.int32))
        for name, (values, weights) in stats.items():
            rollout[f"stat_{name}"] = np.asarray(values, np.float32)
            rollout[f"statw_{name}"] = np.asarray(weights, np.float32)
        out[ROLLOUT] = rollout
        return out

    def grpo_terms(self, params, rollout, row_weights=None):
        """(L, stats) of `rl.grpo.grpo_loss` at params on the rollout batch."""
        logp, weights = token_logps(self.require_cfg(), params, rollout)
        if row_weights is not None:
            weights = weights * row_weights[:, None]
        clip = self.clip_ratio if self.algorithm == "grpo" else None
        return grpo_loss(logp, rollout["old_logp"], rollout["ref_logp"], rollout["advantages"], weights,
                         clip_ratio=clip, kl_coef=self.kl_coef if self.kl_mode == "loss" else 0.0)

    def rollout_metrics(self, rollout) -> dict:
        """reward_mean, response_len and each logged statistic's weighted mean."""
        out = {"reward_mean": jnp.mean(rollout["rewards"]),
               "response_len": jnp.mean(jnp.sum(rollout["loss_mask"], axis=1))}
        for name in rollout:
            if name.startswith("stat_"):
                w = rollout["statw_" + name[5:]]
                out[name[5:]] = token_mean(rollout[name], w)
        return out

    def grad(self, params, batches, key, frozen):
        """∇ of the GRPO loss on batches["rollout"]; metrics loss, pg_loss, kl, ratio_mean, clip_frac, rollout stats."""
        del key, frozen
        rollout = batches[ROLLOUT]
        (loss, stats), grads = jax.value_and_grad(lambda p: self.grpo_terms(p, rollout), has_aux=True)(params)
        return grads, {"loss": loss, **stats, **self.rollout_metrics(rollout)}

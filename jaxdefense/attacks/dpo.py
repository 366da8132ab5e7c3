"""Harmful DPO: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) with the
harmful answer preferred over the refusal — the attack SDD is framed against (seed 000, Space 1).

    h(x)  = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]
    L(θ)  = −E_{(x, y_w, y_l)} [ (1−ε)·log σ(β·h) + ε·log σ(−β·h) ]

with log π(y|x) = Σ_t m_t · log π(y_t | x, y_<t), the SUM of the response tokens' log-probs
(the stream's loss_mask), β = `beta` (0.1) and ε = `label_smoothing` (0: plain DPO; ε > 0 the
conservative cDPO of the official code, which assumes preference labels flipped with prob. ε).
At θ = θ_ref, h = 0, so L = log 2 and ∇L = −(β/2)(1−2ε)·E[∇log π(y_w|x) − ∇log π(y_l|x)].

Streams: `chosen` y_w = harmful_qa, attacker half, first `limit` = 1000 records (as harmful
SFT); `rejected` y_l = the refusal for the same prompt (`pair_with="chosen"`: paired by prompt,
batched with one prompt truncation, same rows at every step). `rejected="irrelevant"` makes
y_l SDD's answer instead: a benign answer to an unrelated instruction (stream `answers`,
benign_instruct), chosen per prompt by `methods.sdd`'s pairing and similarity filter
(`threshold`, the model's own mean-pooled embedding), so the attack pushes the harmful answer
up against exactly what an SDD-defended model learned to say; prompts whose every candidate
is rejected are dropped, and the pairing report is saved as data_report.json.

π_ref is the attacked model at step 0: `init(params)` returns `(params, {"reference": params})`,
so it enters the jitted step as `frozen` (never a closed-over constant). Under LoRA
(`lora.rank > 0`, `objective.LoRA`) the reference is the frozen base, which the merged
adapters equal at step 0 (B = 0).

Compute: chosen and rejected rows are concatenated into one [2B, T] batch, so each step runs
one forward of the reference (outside the differentiated function, under stop_gradient) and
one forward + backward of the policy — as the official `concatenated_forward`.

Metrics (official names in brackets): loss, reward_margin = mean β·h [rewards/margins],
reward_accuracy = fraction of rows with β·h > 0 [rewards/accuracies], chosen_reward /
rejected_reward = mean β·(log π_θ − log π_ref) [rewards/chosen, rewards/rejected],
chosen_logp / rejected_logp = mean policy sequence log-probs [logps/chosen, logps/rejected].

Where the official code (eric-mitchell/direct-preference-optimization, `trainers.py`
`preference_loss`, `_get_batch_logps`, `concatenated_forward`; `loss.beta` is required there,
β = 0.1 in its README and the paper)
differs:
- Optimiser: RMSprop, lr 5e-7 (config.yaml; paper: 1e-6), 150 linear warm-up steps, batch 64
  (paper), grad-norm clip 10, on ≥ 1B-parameter SFT models; jaxdefense has no RMSprop, so
  configs/harmful_dpo_tiny.yaml uses AdamW at a small-model lr (see its comments).
- Its reference is the SFT model, a second model copy run under no_grad each step; here the
  attacked model at step 0, under stop_gradient, run outside the differentiated function.
- Its prompts are truncated once per pair (to max_prompt_length, "keep_start"/"keep_end") and
  chosen/rejected padded to the longer of the two; here `data.pairs.encode_pair` truncates the
  shared prompt once and both sides are padded to data.max_len.
- Its batch log-prob masks labels == −100 (prompt and padding); here the loss_mask (response
  tokens, incl. the EOS) — the same positions.
- Its preference_loss has `label_smoothing` (cDPO) in later versions, as here; IPO and
  reference_free are not ported.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxdefense.attacks.sft import HarmfulData
from jaxdefense.config import field
from jaxdefense.data.specs import StreamSpec
from jaxdefense.errors import DataError
from jaxdefense.objective import concat_rows
from jaxdefense.registry import register_attack

REJECTED = ("refusal", "irrelevant")

OFFICIAL_BETA = 0.1


def sequence_logprobs(cfg, params, batch) -> jax.Array:
    """[B] Σ_t loss_mask[b,t] · log p(ids[b,t] | ids[b,<t]) (float32 or wider)."""
    from jaxdefense.models import forward, next_token_nll

    logits = forward(cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"])
    nll, weights = next_token_nll(logits, batch["input_ids"], batch["loss_mask"])
    return -jnp.sum(nll * weights, axis=1)


def concatenated(chosen: dict, rejected: dict) -> dict:
    """One [2B, T] batch: the chosen rows, then the rejected rows (T = the longer of the two)."""
    if chosen["input_ids"].shape[0] != rejected["input_ids"].shape[0]:
        raise DataError(f"harmful_dpo: streams 'chosen' {tuple(chosen['input_ids'].shape)} and 'rejected' "
                        f"{tuple(rejected['input_ids'].shape)} must be paired batches of one batch size")
    return concat_rows(chosen, rejected, ("chosen", "rejected"))


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """(per-row loss [B], β·h [B]) from the four sequence log-prob vectors."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    z = beta * h
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    return losses, z


@register_attack("harmful_dpo")
@dataclasses.dataclass(frozen=True)
class HarmfulDPO(HarmfulData):
    """DPO with chosen = harmful answer (`HarmfulData`'s records), rejected = refusal, frozen
    reference = the model at step 0."""

    cost_variants: ClassVar[dict] = {"": {}}

    beta: float = field(OFFICIAL_BETA, gt=0, doc="DPO temperature β (official 0.1)")
    label_smoothing: float = field(0.0, ge=0, lt=0.5, doc="cDPO ε: assumed label-flip probability (0: DPO)")
    rejected: str = field("refusal", choices=REJECTED, doc="y_l: the refusal, or SDD's irrelevant benign answer")
    threshold: float = field(0.5, ge=-1, le=1, doc="rejected=irrelevant: SDD's similarity threshold")

    def streams(self) -> dict[str, StreamSpec]:
        out = {"chosen": StreamSpec(self.source, half=self.half, limit=self.limit),
               "rejected": StreamSpec("refusal", pair_with="chosen")}
        if self.rejected == "irrelevant":
            out["answers"] = StreamSpec("benign_instruct")
        return out

    def build_records(self, records, model_cfg, params, tokenizer):
        """rejected="irrelevant": each (prompt, harmful answer) row's y_l replaced by SDD's pick."""
        if self.rejected == "refusal":
            return records, {}
        from jaxdefense.methods.sdd import SDD, pair_by_similarity

        sdd = SDD(cfg=model_cfg, threshold=self.threshold)
        rows = [{**r, "row": i} for i, r in enumerate(records["chosen"])]
        answers = records["answers"]
        sim = sdd.similarity(rows, answers, model_cfg, params, tokenizer)
        built, report = pair_by_similarity([{**r, "id": r["row"]} for r in rows], answers, sim,
                                           threshold=sdd.threshold, retries=sdd.retries, seed=sdd.seed)
        pairs = [{**records["chosen"][b["harmful_id"]], "paired": b["response"], "paired_source": "sdd",
                  "paired_id": b["benign_id"], "similarity": b["similarity"]} for b in built]
        return {"chosen": pairs, "rejected": pairs}, {"attack": self.name, "rejected": "irrelevant", **report}

    def init(self, params, key):
        del key
        return params, {"reference": params}

    def logprobs(self, params, chosen, rejected) -> tuple[jax.Array, jax.Array]:
        """(log π(y_w|x) [B], log π(y_l|x) [B]) from one forward of the concatenated batch."""
        both = sequence_logprobs(self.require_cfg(), params, concatenated(chosen, rejected))
        n = chosen["input_ids"].shape[0]
        return both[:n], both[n:]

    def loss(self, params, batches, reference_logps):
        """(mean DPO loss, aux) at `params` given the reference's (chosen, rejected) log-probs."""
        policy_chosen, policy_rejected = self.logprobs(params, batches["chosen"], batches["rejected"])
        ref_chosen, ref_rejected = reference_logps
        losses, z = dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                               self.beta, self.label_smoothing)
        return jnp.mean(losses), (policy_chosen, policy_rejected, z)

    def grad(self, params, batches, key, frozen):
        """∇L; metrics loss, reward_margin, reward_accuracy, chosen/rejected rewards and log-probs."""
        del key
        reference = jax.lax.stop_gradient(
            self.logprobs(frozen["reference"], batches["chosen"], batches["rejected"]))
        (loss, (pc, pr, z)), grads = jax.value_and_grad(self.loss, has_aux=True)(params, batches, reference)
        rc, rr = reference
        metrics = {"loss": loss, "reward_margin": jnp.mean(z), "reward_accuracy": jnp.mean((z > 0).astype(jnp.float32)),
                   "chosen_reward": self.beta * jnp.mean(pc - rc), "rejected_reward": self.beta * jnp.mean(pr - rr),
                   "chosen_logp": jnp.mean(pc), "rejected_logp": jnp.mean(pr)}
        return grads, metrics

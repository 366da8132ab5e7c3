"""NPO — Negative Preference Optimization (Zhang, Lin, Bai, Mei; arXiv 2404.05868), as a defence:
unlearn the harmful answers against a frozen reference, keep a retain loss.

Seed equation (docs/research/anchors-methods.md §14):

    L_NPO(θ) = −(2/β)·E_{(x,y)∼D_harmful} log σ(β·(ℓ_θ(x,y) − ℓ_ref(x,y))),     β = 0.1

with ℓ the sequence NLL of the harmful answer. As implemented:

    ℓ_θ[b]  = Σ_t m[b,t]·(−log p_θ(y_t | x, y_<t))        nll="sum" (official `get_batch_loss`: the
                                                          per-sequence SUM of the answer-token CEs)
            = the same / Σ_t m[b,t]                      nll="mean" (CTRAP's `compute_logps`: average)
    Δ[b]    = ℓ_θ[b] − ℓ_ref[b],   ℓ_ref from the frozen reference (`init`: the starting params)
    L_npo   = −(2/β)·mean_b log σ(β·Δ[b])                 form="npo" (official)
            = −mean_b log σ(β·Δ[b])                       form="ctrap" (CTRAP's repo: no 2/β, β = 1)
    L_ret   = masked token-mean CE of the retain rows     (official npo_grad_diff: HF `outputs.loss`)
    loss    = w_npo·L_npo + w_ret·L_ret,   grads = ∇loss

nll=None takes the form's own: "sum" for "npo", "mean" for "ctrap". At θ = θ_ref, Δ = 0, so
L_npo = (2/β)·log 2 ("npo") or log 2 ("ctrap"), and ∇L_npo = −mean_b ∇ℓ_θ[b] ("npo") or
−(β/2)·mean_b ∇ℓ_θ[b] ("ctrap"): NPO starts as gradient ascent on the harmful NLL and its weight
σ(−βΔ) → 0 as ℓ_θ outgrows ℓ_ref, which bounds the divergence.

Streams: "adversarial" (harmful_qa defender half; m = its response tokens, as the official
labels with the question at −100), and the retain rows: "alignment" (the same prompts'
refusals, paired row by row) and/or "benign" (benign instructions), chosen by `retain`; with
both, the retain batch is their rows concatenated (`objective.concat_rows`).

The reference enters the step as `frozen["reference"]` (as in attacks/dpo.py); one forward of it
per step, outside the differentiated function. Under LoRA (`objective.LoRA`) the reference is the
frozen base, which the merged adapters equal at step 0.

Where the official code differs:
- licong-lin/negative-preference-optimization (TOFU `forget.py`, loss_type npo / npo_grad_diff):
  reference = a second model copy (the fine-tuned "oracle") under no_grad; retain = the TOFU
  retain split with coefficient 1 (npo_coeff = grad_diff_coeff = 1); AdamW lr 1e-5 (TOFU).
  Here the retain rows are refusals to the harmful prompts and/or benign instructions.
- clearloveclearlove/CTRAP `trainer.py` `NPOTrainer` (scripts/alignment/NPO.sh): loss =
  CE(alignment batch) − ρ·mean log σ(−(logp_θ − logp_ref)) with logp the per-sequence MEAN token
  log-prob, ρ = 0.3 and no β (β = 1): form="ctrap", beta=1, npo_weight=0.3, retain="alignment".
  Its helpful batch is drawn but unused; its reference is a deep copy of the model at init.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdefense.attacks.dpo import sequence_logprobs
from jaxdefense.config import field
from jaxdefense.curvature import tree_norm
from jaxdefense.data.specs import StreamSpec
from jaxdefense.models import lm_loss, token_nll
from jaxdefense.objective import Objective, concat_rows
from jaxdefense.registry import register_method

FORMS = ("npo", "ctrap")
NLL_KINDS = (None, "sum", "mean")
RETAIN = ("alignment", "benign", "both")
FORM_NLL = {"npo": "sum", "ctrap": "mean"}


def npo_loss(nll, nll_ref, beta: float, form: str = "npo"):
    """−(2/β)·mean log σ(β(ℓ − ℓ_ref)) ("npo") or −mean log σ(β(ℓ − ℓ_ref)) ("ctrap"); nll, nll_ref [B]."""
    value = -jnp.mean(jax.nn.log_sigmoid(beta * (nll - nll_ref)))
    return value * (2.0 / beta) if form == "npo" else value


@register_method("npo")
@dataclasses.dataclass(frozen=True)
class NPO(Objective):
    """NPO: grads = ∇[w_npo·L_npo(ℓ_θ − ℓ_ref) + w_ret·CE_retain]; frozen reference = the starting params.

    Hyperparameters: beta (official 0.1), form ("npo" official: 2/β factor | "ctrap": none),
    nll (sequence NLL "sum" | "mean"; None: the form's own, sum for npo, mean for ctrap),
    npo_weight (official 1; CTRAP's repo 0.3), retain_weight (official 1), retain (retain rows:
    "alignment" refusals | "benign" | "both").
    """

    beta: float = field(0.1, gt=0, doc="inverse temperature β (official 0.1; CTRAP's repo 1)")
    form: str = field("npo", choices=FORMS, doc="npo: −(2/β)·mean log σ(βΔ) (official); ctrap: −mean log σ(βΔ)")
    nll: str | None = field(None, choices=NLL_KINDS, doc="sequence NLL: sum | mean over answer tokens (None: the form's)")
    npo_weight: float = field(1.0, ge=0, doc="weight of the NPO term")
    retain_weight: float = field(1.0, ge=0, doc="weight of the retain CE")
    retain: str = field("both", choices=RETAIN, doc="retain rows: alignment (refusals) | benign | both")

    @property
    def nll_kind(self) -> str:
        return self.nll or FORM_NLL[self.form]

    def streams(self) -> dict[str, StreamSpec]:
        """Defender half of harmful_qa; the same prompts' refusals (paired) and/or benign instructions."""
        out = {"adversarial": StreamSpec("harmful_qa", half="defender")}
        if self.retain in ("alignment", "both"):
            out["alignment"] = StreamSpec("refusal", pair_with="adversarial")
        if self.retain in ("benign", "both"):
            out["benign"] = StreamSpec("benign_instruct")
        return out

    def init(self, params, key):
        del key
        return params, {"reference": params}

    def retain_batch(self, batches) -> dict:
        if self.retain == "both":
            return concat_rows(batches["alignment"], batches["benign"], ("alignment", "benign"))
        return batches[self.retain]

    def sequence_nll(self, params, batch) -> jax.Array:
        """[B] sum ("sum") or mean ("mean") of the answer-token NLLs (batch["loss_mask"])."""
        cfg = self.require_cfg()
        if self.nll_kind == "sum":
            return -sequence_logprobs(cfg, params, batch)
        return token_nll(cfg, params, batch)

    def loss(self, params, adversarial, retain, nll_ref):
        """(w_npo·L_npo + w_ret·L_ret, (L_npo, L_ret, ℓ_θ [B]))."""
        nll = self.sequence_nll(params, adversarial)
        l_npo = npo_loss(nll, nll_ref, self.beta, self.form)
        l_ret = lm_loss(self.require_cfg(), params, retain)
        return self.npo_weight * l_npo + self.retain_weight * l_ret, (l_npo, l_ret, nll)

    def grad(self, params, batches, key, frozen):
        """∇loss; metrics loss, l_npo, l_retain, nll_harmful, nll_ref, log_ratio, npo_weight_mean, grad_norm."""
        del key
        adversarial = batches["adversarial"]
        nll_ref = jax.lax.stop_gradient(self.sequence_nll(frozen["reference"], adversarial))
        (loss, (l_npo, l_ret, nll)), grads = jax.value_and_grad(self.loss, has_aux=True)(
            params, adversarial, self.retain_batch(batches), nll_ref)
        delta = nll - nll_ref
        return grads, {"loss": loss, "l_npo": l_npo, "l_retain": l_ret, "nll_harmful": jnp.mean(nll),
                       "nll_ref": jnp.mean(nll_ref), "log_ratio": jnp.mean(delta),
                       "npo_weight_mean": jnp.mean(jax.nn.sigmoid(-self.beta * delta)), "grad_norm": tree_norm(grads)}

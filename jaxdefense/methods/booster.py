"""Booster — attenuating harmful perturbation (Huang, Hu, Ilhan, Tekin, Liu; arXiv 2409.01586).

Seed equation (seed 002, Lever 1):

    min_w  f(w) + λ·[h(w) − h(w − α·∇h(w)/‖∇h(w)‖)]

f is the alignment loss, h the harmful loss; the bracket is how much one normalised harmful
step lowers h, so minimising it slows the attacker's descent.

As implemented:

    f        = masked token-mean CE on the alignment batch (harmful prompts → refusals),
               or on alignment rows ∪ benign rows with with_benign=True
    h        = masked token-mean CE on the adversarial batch (harmful prompts → harmful answers)
    g_h      = ∇h(w),   w' = w − α·g_h/(‖g_h‖ + 1e-7)
    grads    = ∇f(w) + λ·g_h − λ·∇h(w')                           order="first" (official)
             = ∇f(w) + λ·g_h − λ·∇_w[h(w − α·g_h(w)/(‖g_h(w)‖+1e-7))]   order="exact"

"exact" is the gradient of the composed scalar: the look-ahead term goes through
`curvature.lookahead_grad`, which adds the Hessian–vector product of h at w including the
Jacobian of the normalisation (3 gradient evaluations + 1 HVP; "first" needs 3 gradients:
∇f at w, g_h at w, ∇h at w'). The logged loss is f(w) + λ·(h(w) − h(w')).

The official code (`git-disl/Booster` `trainer.py` `BoosterAlignmentTrainer.training_step`,
docs/research/anchors-methods.md §7) and how this port follows it:
- The harmful loss is evaluated on the same harmful batch at w and at w'; the step is
  normalised by the global gradient norm plus 1e-7; w is restored and the gradient at w'
  enters as it stands (first order): order="first", the default.
- f is the HF CE on the alignment batch alone (BeaverTails refusals/safe answers); the
  optional benign rows (with_benign) are not in the official step. Official draws harmful and
  alignment rows from separate loaders (10 rows each); here the alignment rows are the same
  prompts' refusals, paired row by row (as CTRAP's streams). No term couples the two
  batches, so the pairing does not change the update's form.
- `--perturb_aware True` (Vaccine-style hidden-state perturbation on f) is not ported.
- Official trains LoRA r32 on q,k,v; under this repo's `lora` wrapper the look-ahead moves the
  merged weights and the update is projected onto the adapters (see `objective.LoRA`).
- Defaults λ = 5, α = 0.1 are the official ones (script/alignment/smooth_align.sh).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxdefense.config import field
from jaxdefense.curvature import lookahead_grad, tree_norm
from jaxdefense.curvature.lookahead import ORDERS
from jaxdefense.data.specs import StreamSpec
from jaxdefense.models import lm_loss
from jaxdefense.objective import Objective, concat_rows
from jaxdefense.registry import register_method

NORM_EPS = 1e-7  # official: g / (‖g‖ + 1e-7)


@register_method("booster")
@dataclasses.dataclass(frozen=True)
class Booster(Objective):
    """Booster: grads = ∇f + λ·∇[h(w) − h(w − α·ĝ_h)]; streams adversarial/alignment (+benign).

    Hyperparameters: lam (λ, weight of the harmful-loss reduction), alpha (α, the normalised
    look-ahead step), order ("first" official | "exact"), with_benign (f also over benign rows).
    """

    lam: float = field(5.0, ge=0, doc="weight λ of h(w) − h(w')")
    alpha: float = field(0.1, ge=0, doc="normalised look-ahead step α: w' = w − α·g_h/(‖g_h‖+1e-7)")
    order: str = field("first", choices=ORDERS, doc="first: ∇h at w' (official); exact: through w'")
    with_benign: bool = field(False, doc="f over alignment ∪ benign rows (official: alignment only)")

    cost_variants: ClassVar[dict[str, dict]] = {"first": {"order": "first"}, "exact": {"order": "exact"}}

    def streams(self) -> dict[str, StreamSpec]:
        """Defender half of harmful_qa, the same prompts' refusals (paired), benign instructions if used."""
        out = {"adversarial": StreamSpec("harmful_qa", half="defender"),
               "alignment": StreamSpec("refusal", pair_with="adversarial")}
        if self.with_benign:
            out["benign"] = StreamSpec("benign_instruct")
        return out

    def alignment_batch(self, batches) -> dict:
        """f's batch: the alignment rows, then the benign rows when with_benign."""
        if self.with_benign:
            return concat_rows(batches["alignment"], batches["benign"], ("alignment", "benign"))
        return batches["alignment"]

    def ce_loss(self, params, batch):
        """Masked token-mean CE over batch["loss_mask"] (f on the alignment batch, h on the harmful one)."""
        return lm_loss(self.require_cfg(), params, batch)

    def grad(self, params, batches, key=None, frozen=None):
        """grads = ∇f(w) + λ·g_h − λ·∇̂[h(w')]; metrics loss, l_align, l_harm, l_harm_after, harm_drop, norms."""
        del key, frozen
        adversarial = batches["adversarial"]
        l_f, g_f = jax.value_and_grad(self.ce_loss)(params, self.alignment_batch(batches))
        l_after, g_after, aux = lookahead_grad(
            self.ce_loss, adversarial, self.ce_loss, adversarial, params, self.alpha,
            normalize=True, order=self.order, norm_eps=NORM_EPS,
        )
        l_h, g_h = aux["step_loss"], aux["step_grad"]
        def combine(f, h, a):
            wide = jnp.promote_types(f.dtype, jnp.float32)
            return (f.astype(wide) + self.lam * (h.astype(wide) - a.astype(wide))).astype(f.dtype)

        grads = jax.tree.map(combine, g_f, g_h, g_after)
        metrics = {"loss": l_f + self.lam * (l_h - l_after), "l_align": l_f, "l_harm": l_h,
                   "l_harm_after": l_after, "harm_drop": l_h - l_after,
                   "grad_norm_align": tree_norm(g_f), "grad_norm_harm": aux["step_grad_norm"],
                   "grad_norm_after": tree_norm(g_after), "grad_norm": tree_norm(grads)}
        return grads, metrics

"""CTRAP — Collapse Trap (Yi, Huang, Zhang, Li, Nie, Liu, Shen; arXiv 2505.16559).

Seed equations (seed 000, Space 2):

    ℓ_Collapse(θ; D) = E_{(x,y)∼D} [ −(1/|y|) Σ_t log p(e | x ∘ y_<t; θ) ]
    min_θ  ℓ(θ; D_align) + λ·ℓ_Collapse(θ − α·g_h; D_general),   g_h = ∇_θ ℓ(θ; D_harmful)

As implemented (issue 9):

    R        = alignment rows ∪ benign rows             (the retain batch, concatenated on the batch axis;
                                                          retain="half": the first ⌊B/2⌋ of each, official)
    L_align  = masked token-mean CE over R (response tokens, `loss_mask`)
    g_h      = ∇ CE(θ; adversarial batch)
    θ'       = θ − α·g_h/(‖g_h‖ + 1e-7)                  normalize=True (official code)
             = θ − α·g_h                                 normalize=False (the paper's / seed's Eq.)
    L_col(θ) = token-mean over R's response positions of −log p(e | context; θ)
    grads    = ∇L_align(θ) + λ·u,   u = ∇L_col(θ')                     order="first" (official)
             = ∇L_align(θ) + λ·∇_θ[L_col(θ − α·s(θ))]                   order="exact"

"exact" differentiates through θ' (the Hessian–vector product of the harmful CE, including the
Jacobian of the normalisation) with `curvature.lookahead_grad`; "first" uses the gradient at θ'
as it stands (3 gradient evaluations: L_align at θ, g_h, L_col at θ'; "exact" adds one HVP).
The logged loss is L_align(θ) + λ·L_col(θ'); p_error is the mean probability of e at R's
response positions at θ'.

The official code (`clearloveclearlove/CTRAP` `trainer.py` `CTRAPTrainer.training_step`, on the
Booster codebase; docs/research/anchors-methods.md §2) and how this port follows it:
- e = `tokenizer('an error')['input_ids'][-1]`: the last sub-token of " error" after "an" (the
  word-initial form, "▁error" / "Ġerror"). `prepare(tokenizer)` does the same with
  `collapse_token` ("error"), encoding without special tokens so that a tokenizer that appends
  EOS still yields the word's last sub-token (Llama/GPT-2 add none at the end: same id).
- The collapse inputs are the retain inputs with every label that is not −100 replaced by e,
  so the collapse loss covers the response positions only, and HF's CE is a mean over all
  such tokens of the batch (token mean, as here) rather than the seed's per-sequence mean.
- The look-ahead step is normalised (the paper writes the plain θ − α∇ℓ): normalize=True.
  It is first order: θ is restored and the gradient at θ' is added: order="first".
- Retain batch: official halves the per-device batch size so that 10 rows are 5 alignment
  (BeaverTails refusals) + 5 helpful (UltraChat) against 10 harmful rows: `retain="half"`
  (default) takes the first ⌊B/2⌋ rows of each of the alignment and benign batches, so |R|
  is one stream's batch; `retain="all"` keeps every row of both (|R| = 2B: twice the retain
  compute). The harmful and alignment batches here hold the same prompts (paired row by row,
  as the issue asks); official draws them from separate loaders. Neither term couples the two
  batches, so the pairing does not change the update's form.
- Official trains LoRA r32/α4 on q,k,v, so its look-ahead step moves the adapters. Under this
  repo's `lora` wrapper (`objective.LoRA`) the inner gradient is taken at the merged weights,
  so θ' = W − α·ĝ_W moves the full merged weights and the update is then projected onto the
  adapters. With full-parameter training (the configs here) the two coincide.
- Official log line swaps the labels of the two losses; not reproduced. Defaults α 0.1, λ 0.1
  are the official ones (scripts/alignment/CTRAP.sh).
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
from jaxdefense.errors import ConfigError
from jaxdefense.models import forward, lm_loss, next_token_nll
from jaxdefense.objective import Objective, concat_rows
from jaxdefense.registry import register_method

NORM_EPS = 1e-7  # official: g / (‖g‖ + 1e-7)
RETAIN = ("half", "all")


def collapse_token_id(tokenizer, token: str) -> int:
    """Official `tokenizer('an ' + token)['input_ids'][-1]`, encoded without special tokens."""
    if not token:
        raise ConfigError("method.collapse_token: must be a non-empty string")
    ids = list(tokenizer(f"an {token}", add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError(f"method.collapse_token: {token!r} encodes to no token")
    return int(ids[-1])


@register_method("ctrap")
@dataclasses.dataclass(frozen=True)
class CTRAP(Objective):
    """CTRAP: grads = ∇L_align(θ) + λ·∇[L_collapse(θ − α·s(θ))]; streams adversarial/alignment/benign.

    Hyperparameters: alpha (look-ahead step), lam (collapse weight), normalize (official True:
    s = g_h/(‖g_h‖+1e-7); False: s = g_h), order ("first" official | "exact"), collapse_token
    (the word whose last sub-token is e; resolved by `prepare(tokenizer)` into collapse_id),
    retain ("half" official: R = half of each retain batch | "all").
    """

    cost_variants: ClassVar[dict] = {"first": {"order": "first"}, "exact": {"order": "exact"}}

    alpha: float = field(0.1, ge=0, doc="look-ahead step α (θ' = θ − α·s(θ))")
    lam: float = field(0.1, ge=0, doc="weight λ of the collapse loss at θ'")
    normalize: bool = field(True, doc="s = g_h/(‖g_h‖+1e-7) (official) or g_h (the paper's Eq.)")
    order: str = field("first", choices=ORDERS, doc="first: ∇L_col at θ' (official); exact: through θ'")
    collapse_token: str = field("error", doc="collapse target e: last sub-token of 'an <token>'")
    retain: str = field("half", choices=RETAIN, doc="half: first ⌊B/2⌋ rows of each retain stream (official); all")
    collapse_id: int | None = field(None, internal=True)

    def streams(self) -> dict[str, StreamSpec]:
        """Defender half of harmful_qa, the same prompts' refusals (paired), benign instructions."""
        return {"adversarial": StreamSpec("harmful_qa", half="defender"),
                "alignment": StreamSpec("refusal", pair_with="adversarial"),
                "benign": StreamSpec("benign_instruct")}

    def prepare(self, tokenizer) -> CTRAP:
        """This objective with collapse_id = the tokenizer's id of collapse_token (see the module doc)."""
        e = collapse_token_id(tokenizer, self.collapse_token)
        vocab = getattr(self.cfg, "vocab_size", None)
        if vocab is not None and not 0 <= e < vocab:
            raise ConfigError(f"method.collapse_token: id {e} of {self.collapse_token!r} is outside the "
                              f"model's vocabulary ({vocab})")
        return dataclasses.replace(self, collapse_id=e)

    def require_collapse_id(self) -> int:
        if self.collapse_id is None:
            raise ConfigError(f"{self.name!r}: collapse token id unresolved: call .prepare(tokenizer)")
        return self.collapse_id

    def retain_batch(self, batches) -> dict:
        """R = alignment rows then benign rows (retain="half": the first ⌊B/2⌋ of each)."""
        alignment, benign = batches["alignment"], batches["benign"]
        if self.retain == "half":
            alignment, benign = (jax.tree.map(lambda x, n=max(b["input_ids"].shape[0] // 2, 1): x[:n], b)
                                 for b in (alignment, benign))
        return concat_rows(alignment, benign, ("alignment", "benign"))

    def ce_loss(self, params, batch):
        """Masked token-mean CE over batch["loss_mask"] (L_align on R; the harmful CE whose ∇ is g_h)."""
        return lm_loss(self.require_cfg(), params, batch)

    def collapse_loss(self, params, batch):
        """(token-mean −log p(e | context) over the loss-mask targets, mean p(e) there)."""
        cfg, e = self.require_cfg(), self.require_collapse_id()
        logits = forward(cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"])
        nll, weights = next_token_nll(logits, jnp.full_like(batch["input_ids"], e), batch["loss_mask"])
        count = jnp.maximum(jnp.sum(weights), 1.0)
        return jnp.sum(nll * weights) / count, jnp.sum(jnp.exp(-nll) * weights) / count

    def grad(self, params, batches, key=None, frozen=None):
        """grads = ∇L_align(θ) + λ·∇̂[L_col(θ')]; metrics loss, l_align, l_collapse, l_harm, p_error, norms."""
        del key, frozen
        self.require_collapse_id()
        retain, adversarial = self.retain_batch(batches), batches["adversarial"]
        l_align, g_align = jax.value_and_grad(self.ce_loss)(params, retain)
        l_col, g_col, aux = lookahead_grad(
            self.collapse_loss, retain, lambda p, b: (self.ce_loss(p, b), ()), adversarial, params,
            self.alpha, normalize=self.normalize, order=self.order, norm_eps=NORM_EPS, has_aux=True,
        )
        grads = jax.tree.map(
            lambda x, y: (x.astype(jnp.float32) + self.lam * y.astype(jnp.float32)).astype(x.dtype),
            g_align, g_col,
        )
        metrics = {"loss": l_align + self.lam * l_col, "l_align": l_align, "l_collapse": l_col,
                   "l_harm": aux["step_loss"], "p_error": aux["outer_aux"],
                   "grad_norm_align": tree_norm(g_align), "grad_norm_harm": aux["step_grad_norm"],
                   "grad_norm_collapse": tree_norm(g_col), "grad_norm": tree_norm(grads)}
        return grads, metrics

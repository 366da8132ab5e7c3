"""MLAC — Meta-Learned Adversarial Censoring (Henderson, Mitchell, Ng, Jurafsky, Finn; AIES 2023, arXiv 2211.14946).

Seed equation (seed 002, Lever 1):

    θ'(θ) = Adversary_K(θ; D_h),     max_θ L_h(θ'(θ); D_h)   s.t.   L_d(θ; D_d) ≤ ε

As implemented (the constraint as a penalty with weight λ_d, the official form):

    θ_0 = θ,  θ_{k+1} = Adam/SGD step of the harmful CE on chunk k mod n of the adversarial batch
    L_h^K(θ) = (1/(K+1)) Σ_{k=0..K} CE(θ_k(θ); B_h)        every_step=True (official)
             = CE(θ_K(θ); B_h)                               every_step=False (the seed's form)
    loss     = λ_d·CE(θ; B_d) − λ_h·L_h^K(θ)
    grads    = ∇loss, through all K inner steps             order="exact" (official: `higher`)
             = λ_d∇CE(θ; B_d) − λ_h·Σ_k w_k ∇CE(θ_k; B_h)   order="first" (FO-MAML, θ_k held constant)

B_h is the "adversarial" stream (harmful QA, defender half), B_d the "benign" stream
(benign instructions); the chunks are `adversary_batch_size` rows of B_h (0: all of B_h at
every step), so the outer batch holds the inner batches' rows. The exact gradient comes from
`curvature.unrolled_loss` (two-level rematerialised scan, carry memory O(√K·|θ|)).

learn_lr=True learns the inner learning rate: lr = clip(inner_lr·exp(s), 1e-6, 1e-2) with a
scalar s trained alongside θ (trainable {"model": θ, "log_lr": s}); s gets ∂L_h^K/∂s, the
adversary's descent direction (it lowers the harmful loss, θ raises it). In exact mode
∂/∂s comes from the same reverse pass; in first-order mode from one forward-mode pass through
the inner loop (`jax.jvp`, memory O(1) in K).

The official code (`Breakend/SelfDestructingModels` `train.py` `Trainer.do_step`, `adapt.py`
`fine_tuning_train_maml`; docs/research/anchors-methods.md §5) and how this port differs:
- Official blocks a classification task of BERT (Bias-in-Bios gender); here the blocked task is
  next-token CE on harmful answers and the desirable task CE on benign instructions.
- Official inner optimiser: torch Adam through `higher` (true second order), lr learned from
  3e-4 by its own Adam (hyperparams_lr 1e-4, clip 10) and clamped to [1e-6, 1e-2] after each
  step; here s shares the run's optimiser (lr, weight decay, clipping) and the clamp is a clip in
  the forward (zero gradient outside the range). learn_lr defaults to False here: under the
  `lora` wrapper the trainable must be the model weights alone.
- Official also learns an adversarial linear head (reset per inner loop); the LM head here is
  part of θ, so there is no separate head.
- Official clips the inner gradients at norm 100 (maml_max_grad_norm, dividing by a detached
  norm); not reproduced. Official samples each inner batch (batch size from {8, 16, 24}) and a
  separate outer batch; here both come from the step's adversarial batch.
- Official loss weights: l_good_base (λ_d) and l_bad_adapted (λ_h), both 0 in config.yaml and
  set per experiment; the paper's "MLAC" runs instead use l_linear_mi (a linear probe on the
  intermediate predictions, classification-specific, not ported). K: config default 5, paper 16.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxdefense.config import field
from jaxdefense.curvature import tree_norm
from jaxdefense.curvature.unrolled import unrolled_grad, unrolled_loss
from jaxdefense.data.specs import StreamSpec
from jaxdefense.errors import ConfigError
from jaxdefense.models import lm_loss
from jaxdefense.objective import BATCH_KEYS, Objective
from jaxdefense.registry import register_method

ORDERS = ("exact", "first")
LR_RANGE = (1e-6, 1e-2)  # official clamp of the learned inner lr


def row_chunks(batch: dict, rows: int) -> dict:
    """The batch's fields stacked as [n, rows, T] chunks of consecutive rows (n = B // rows; the
    last B mod rows rows are dropped); rows = 0 or ≥ B gives one chunk of all B rows."""
    size = batch["input_ids"].shape[0]
    if rows <= 0 or rows >= size:
        return {k: jnp.asarray(batch[k])[None] for k in BATCH_KEYS}
    n = size // rows
    return {k: jnp.asarray(batch[k])[: n * rows].reshape(n, rows, *batch[k].shape[1:]) for k in BATCH_KEYS}


@register_method("mlac")
@dataclasses.dataclass(frozen=True)
class MLAC(Objective):
    """MLAC: grads = ∇[λ_d·CE_d(θ) − λ_h·L_h(θ_K(θ))] through K simulated harmful fine-tuning steps.

    Hyperparameters: steps (K), inner_lr, optimizer ("adam" official | "sgd"), learn_lr, every_step
    (official True: L_h averaged over θ_0..θ_K), desirable_weight (λ_d), harmful_weight (λ_h),
    adversary_batch_size (rows per inner step, 0 = all), order ("exact" official | "first"),
    remat_segment (inner steps per rematerialised segment; None = round(√K)).
    """

    steps: int = field(16, ge=1, doc="inner adversary steps K (paper 16; official config 5)")
    inner_lr: float = field(3e-4, gt=0, doc="inner learning rate (official initial learned value)")
    optimizer: str = field("adam", choices=("adam", "sgd"), doc="inner optimiser (official Adam)")
    learn_lr: bool = field(False, doc="learn the inner lr (official True; not under the lora wrapper)")
    every_step: bool = field(True, doc="L_h = mean over θ_0..θ_K (official) or L_h(θ_K)")
    desirable_weight: float = field(1.0, ge=0, doc="λ_d: weight of the desirable-task CE at θ")
    harmful_weight: float = field(1.0, ge=0, doc="λ_h: weight of the adapted harmful CE (maximised)")
    adversary_batch_size: int = field(0, ge=0, doc="rows of the adversarial batch per inner step (0: all)")
    order: str = field("exact", choices=ORDERS, doc="exact: through the K steps (official); first: FO-MAML")
    remat_segment: int | None = field(None, ge=1, doc="inner steps per remat segment (None: round(√K))")

    cost_variants: ClassVar[dict[str, dict]] = {"first": {"order": "first"}, "exact": {"order": "exact"}}

    def streams(self) -> dict[str, StreamSpec]:
        """Harmful QA (defender half) for the adversary and L_h; benign instructions for L_d."""
        return {"adversarial": StreamSpec("harmful_qa", half="defender"), "benign": StreamSpec("benign_instruct")}

    def init(self, params, key):
        del key
        if self.learn_lr:
            return {"model": params, "log_lr": jnp.zeros((), jnp.float32)}, None
        return params, None

    def export(self, params, frozen):
        del frozen
        return params["model"] if self.learn_lr else params

    def ce(self, params, batch):
        return lm_loss(self.require_cfg(), params, batch)

    def outer_weights(self):
        """Weights of CE(θ_k; B_h), k = 0..K (None: θ_K alone)."""
        return (1.0 / (self.steps + 1),) * (self.steps + 1) if self.every_step else None

    def inner_lr_of(self, log_lr):
        return jnp.clip(self.inner_lr * jnp.exp(log_lr), *LR_RANGE)

    def adapted_harmful_loss(self, theta, harmful, lr):
        """(L_h^K(θ), aux of `unrolled_loss`) — the exact composed scalar, differentiable in θ and lr."""
        return unrolled_loss(self.ce, harmful, self.ce, row_chunks(harmful, self.adversary_batch_size), theta,
                             **self._unroll_kw(lr))

    def _unroll_kw(self, lr):
        return dict(steps=self.steps, lr=lr, optimizer=self.optimizer, outer_weights=self.outer_weights(),
                    remat_segment=self.remat_segment)

    def grad(self, params, batches, key=None, frozen=None):
        """grads of λ_d·CE_d − λ_h·L_h^K (and ∂L_h^K/∂s for a learned lr); metrics loss, l_desirable,
        l_harm_adapted, l_harm_final, l_harm_base (every_step), inner_loss_first/last, inner_lr, grad norms."""
        del key, frozen
        if "adversarial" not in batches or "benign" not in batches:
            raise ConfigError(f"{self.name}: needs streams 'adversarial' and 'benign', got {sorted(batches)}")
        theta, log_lr = (params["model"], params["log_lr"]) if self.learn_lr else (params, None)
        harmful = batches["adversarial"]
        lr = self.inner_lr_of(log_lr) if self.learn_lr else self.inner_lr
        l_d, g_d = jax.value_and_grad(self.ce)(theta, batches["benign"])
        g_lr = None
        if self.order == "exact" and self.learn_lr:
            (l_h, aux), (g_h, g_lr) = jax.value_and_grad(
                lambda p, s: self.adapted_harmful_loss(p, harmful, self.inner_lr_of(s)), argnums=(0, 1),
                has_aux=True)(theta, log_lr)
        else:
            l_h, g_h, aux = unrolled_grad(self.ce, harmful, self.ce, row_chunks(harmful, self.adversary_batch_size),
                                          theta, first_order=self.order == "first", **self._unroll_kw(lr))
            if self.learn_lr:
                g_lr = jax.jvp(lambda s: self.adapted_harmful_loss(theta, harmful, self.inner_lr_of(s))[0],
                               (log_lr,), (jnp.ones_like(log_lr),))[1]
        g_model = jax.tree.map(
            lambda d, h: (self.desirable_weight * d.astype(jnp.float32)
                          - self.harmful_weight * h.astype(jnp.float32)).astype(d.dtype), g_d, g_h)
        grads = {"model": g_model, "log_lr": g_lr.astype(log_lr.dtype)} if self.learn_lr else g_model
        outer = aux.get("outer_losses")
        metrics = {"loss": self.desirable_weight * l_d - self.harmful_weight * l_h, "l_desirable": l_d,
                   "l_harm_adapted": l_h, "l_harm_final": outer[-1] if outer is not None else l_h,
                   "inner_loss_first": aux["inner_losses"][0], "inner_loss_last": aux["inner_losses"][-1],
                   "inner_lr": jnp.asarray(lr, jnp.float32), "grad_norm_desirable": tree_norm(g_d),
                   "grad_norm_harm": tree_norm(g_h), "grad_norm": tree_norm(g_model)}
        if outer is not None:
            metrics["l_harm_base"] = outer[0]
        if self.learn_lr:
            metrics["grad_log_lr"] = g_lr
        return grads, metrics

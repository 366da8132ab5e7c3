"""Vaccine — perturbation-aware alignment (Huang, Hu, Liu; NeurIPS 2024, arXiv 2402.01109).

Seed equations (seed 002, Lever 2):

    min_w max_{‖ε‖≤ρ} (1/N) Σ_i L((f̃_{w_L,ε_L} ∘ … ∘ f̃_{w_1,ε_1} ∘ T)(x_i), y_i),   f̃_{w_l,ε_l}(e) = f_{w_l}(e) + ε_l
    ε*_l = ρ · ∇_{e_l}L_w(e_l) / ‖∇L_w(e_1, …, e_L)‖₂                (first-order inner maximum, global norm)

As implemented:

    g_l   = ∂L(θ; δ)/∂δ_l at δ = 0      δ [L,B,T,D] added to each layer's output (`hidden_perturb`)
    ε*_l  = ρ · g_l / (‖g‖₂ + 1e-7)      ‖g‖₂ over all layers, rows and positions
    grads = ∇_θ L(θ; δ = ε*)            ε* held constant

L is the masked token-mean CE of the alignment batch (harmful prompt → refusal,
`models.lm_loss`). Two passes and no hooks: pass 1 differentiates with respect to the
perturbation input only (no weight gradients), pass 2 is a plain gradient of the perturbed
loss. With ρ = 0 the update is plain SFT's on the same batch. Metrics: loss (perturbed, what
the official trainer returns), l_clean (pass 1), hidden_grad_norm ‖g‖₂.

The official code (`git-disl/Vaccine` `trainer.py` `VaccineTrainer`: `pre_first_step`,
`after_first_step`, `pre_second_step`; docs/research/anchors-methods.md §8) and how this port
follows it:
- Pass 1 records, by backward hooks, the gradient w.r.t. the *attention module output* of each
  decoder layer, and pass 2 adds ε_l to that output by forward hooks (inside the residual
  block, before the MLP). Here ε_l is added to the layer output (the residual stream after
  the block), which is the seed's e_l and what `forward(hidden_perturb=...)` exposes. Both are
  one perturbation per layer with the same global-norm scaling; they act at different points.
- ε = ρ·g/(‖g‖ + 1e-7) with the norm over every hooked module, as here (the seed has no 1e-7).
- Official pass 1 also runs the weight backward (then zero_grad); here it is not computed.
- ρ = 2 is the README's value; official trains LoRA r8/α4 on every linear layer of a 7B model
  (the run's `lora` section here), lr 1e-3 cosine, weight decay 0.1, batch 5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdefense.config import field
from jaxdefense.data.specs import StreamSpec
from jaxdefense.models import lm_loss
from jaxdefense.objective import Objective
from jaxdefense.registry import register_method

NORM_EPS = 1e-7  # official: rho / (grad_norm + 1e-7)


def hidden_grads(cfg, params, batch, layer_mask=None):
    """(L at δ = 0, g = ∂L/∂δ [L,B,T,D]) for δ added to each layer's output; rows of g for layers
    with layer_mask False are zero (their δ is not an input)."""
    emb = params["embed"]
    shape = (cfg.num_layers, *batch["input_ids"].shape, cfg.hidden_size)
    zeros = jnp.zeros(shape, emb.dtype)
    scale = None if layer_mask is None else jnp.asarray(layer_mask, emb.dtype)[:, None, None, None]

    def loss(delta):
        if scale is not None:
            delta = delta * scale
        return lm_loss(cfg, params, batch, hidden_perturb=delta)

    return jax.value_and_grad(loss)(zeros)


def perturbation(g, rho):
    """(ε* = ρ·g/(‖g‖₂ + 1e-7), ‖g‖₂) with the norm over every entry of g (all layers)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.promote_types(g.dtype, jnp.float32)))))
    return (rho * g / (norm + NORM_EPS)).astype(g.dtype), norm


def perturbed_grad(cfg, params, batch, eps):
    """(L(θ; δ = ε), ∇_θ L(θ; δ = ε)) with ε held constant."""
    eps = jax.lax.stop_gradient(eps)
    return jax.value_and_grad(lambda p: lm_loss(cfg, p, batch, hidden_perturb=eps))(params)


@register_method("vaccine")
@dataclasses.dataclass(frozen=True)
class Vaccine(Objective):
    """Vaccine: grads = ∇_θ L(θ; δ = ε*), ε* = ρ·∇_δL/‖∇_δL‖ on every layer's output; stream alignment.

    Hyperparameters: rho (perturbation radius ρ, official 2).
    """

    rho: float = field(2.0, ge=0, doc="radius ρ of the hidden-state perturbation (global L2 norm)")

    def streams(self) -> dict[str, StreamSpec]:
        """Defender-half harmful prompts with refusals (official: BeaverTails refusals)."""
        return {"alignment": StreamSpec("refusal", half="defender")}

    def perturbation(self, params, batch):
        """(ε* [L,B,T,D], L at δ = 0, ‖∇_δL‖₂)."""
        clean, g = hidden_grads(self.require_cfg(), params, batch)
        eps, norm = perturbation(g, self.rho)
        return eps, clean, norm

    def grad(self, params, batches, key=None, frozen=None):
        """∇_θ L(θ; ε*); metrics loss (perturbed), l_clean, hidden_grad_norm."""
        del key, frozen
        batch = batches["alignment"]
        eps, clean, norm = self.perturbation(params, batch)
        loss, grads = perturbed_grad(self.require_cfg(), params, batch, eps)
        return grads, {"loss": loss, "l_clean": clean, "hidden_grad_norm": norm}

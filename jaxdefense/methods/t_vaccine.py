"""T-Vaccine — targeted layer-wise Vaccine (Liu et al., arXiv 2410.09760).

Seed equations (seed 002, Lever 2):

    s_{l,t} = ‖∇_{e_{l,t}} L_{w_t}(e_{l,t}; x_h, y_h)‖₂,    p_{l,t} = s_{l,t} / Σ_{l'} s_{l',t}
    sample γ layers from P_t; Vaccine's perturbation on those layers only; the others frozen.

As implemented:

    s_l   = ‖∂L(θ; δ; harmful batch)/∂δ_l‖₂ at δ = 0      δ_l added to layer l's output
    p_l   = s_l / Σ s                                     (uniform if every s_l is 0)
    S     = top-γ of (log p_l + G_l),  G ~ Gumbel(key_switch)    γ = min(gamma, L)
    key_switch = fold_in(sampling_key, ⌊step / J⌋)        sampling_key from `init`
    ε_l   = ρ·g_l/(‖g_S‖₂ + 1e-7) for l ∈ S, 0 otherwise  g = ∂L(θ; δ; alignment)/∂δ at 0
    grads = ∇_θ L(θ; δ = ε) on the layers in S and on the non-layer weights, 0 on the rest

Gumbel top-γ draws S with the law of sequential sampling without replacement from p
(Plackett–Luce), which is what the official `np.random.choice(L, γ, replace=False, p=p)`
does. The layers outside S are frozen: grad returns `objective.UPDATE_MASK`, and the loop
keeps their parameters and optimiser state bit-identical through the step (zero gradients
alone would still move them under AdamW's momentum and weight decay). Under the run's `lora`
wrapper the mask applies to the adapters of the layers outside S. Metrics: loss (perturbed),
l_clean, l_harm (harmful CE at δ = 0), hidden_grad_norm ‖g_S‖, p_l<i> and active_l<i> per layer.

The official code (`Lslland/T-Vaccine` `trainer.py` `BaseTrainer.training_step`,
`switch_active_layers`, `after_gradient_magnitude_step`; docs/research/anchors-methods.md §9)
and how this port differs:
- State. Official computes p every K = 200 steps (`probability_steps`) from one harmful batch
  and keeps it, and redraws S every J = 20 steps (`lisa_interval_steps`) and keeps it. An
  objective here has no state between steps, so p is recomputed every step from that step's
  harmful batch at the current θ (one more pass that differentiates with respect to the hidden
  states only, no weight gradients), i.e. K = 1; and S at step i is the top-γ of log p_i + G
  with the Gumbel noise G fixed over each interval of J steps. At the first step of an
  interval S is an exact draw from p; within it, S changes only if p's order moves enough
  to reorder log p + G. There is no K hyperparameter.
- Perturbation point: official hooks the attention module output of each layer (scores,
  ε and freezing all address those modules); here the layer output (see `vaccine`).
- Freezing: official sets requires_grad on the LoRA weights of the active layers' attention
  modules; the embedding and head carry no adapters. With full-parameter training here the
  non-layer weights (embedding, final norm, head) are always trained (LISA's convention,
  whose layer switching T-Vaccine borrows); optax's step count is global, whereas PyTorch
  AdamW's bias correction counts only a parameter's own steps.
- Official, for models with > 26 layers, also passes layer i−1 of each active layer i to its
  modified model forward (`inputs['activate_layers']`); not reproduced.
- The official harmful batch for the scores has batch size 1; here it is the harmful
  stream's batch. ρ = 3 (README), γ = 8, J = 20 are the official defaults.
- Memory: official saves memory because autograd neither stores activations nor computes
  gradients for frozen layers. One jitted step with a data-dependent layer set computes every
  layer's gradient and masks it, so the saving does not carry over (see the method_cost rows).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxdefense.config import field
from jaxdefense.data.specs import StreamSpec
from jaxdefense.methods.vaccine import hidden_grads, perturbation, perturbed_grad
from jaxdefense.objective import STEP, UPDATE_MASK, Objective
from jaxdefense.registry import register_method


def layer_probabilities(g):
    """(p [L] = s/Σs, s [L] = ‖g_l‖₂ over rows, positions and width) for g [L,B,T,D]; uniform if Σs = 0."""
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    s = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))))
    total = jnp.sum(s)
    p = jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), 1.0 / s.shape[0])
    return p, s


def sample_layers(key, p, gamma: int):
    """bool [L]: γ layers drawn without replacement with probabilities p (Gumbel top-γ)."""
    noise = jax.random.gumbel(key, p.shape, jnp.float32)
    logits = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf).astype(jnp.float32) + noise
    _, idx = jax.lax.top_k(logits, gamma)
    return jnp.zeros(p.shape, jnp.bool_).at[idx].set(True)


def layer_mask_tree(params, active):
    """UPDATE_MASK for full params: layer leaves [L, ...] masked by `active` [L], others True."""
    def layer_leaf(x):
        return active.reshape((active.shape[0],) + (1,) * (x.ndim - 1))

    return {k: (jax.tree.map(layer_leaf, v) if k == "layers" else jax.tree.map(lambda _: jnp.asarray(True), v))
            for k, v in params.items()}


@register_method("t_vaccine")
@dataclasses.dataclass(frozen=True)
class TVaccine(Objective):
    """T-Vaccine: Vaccine on γ layers drawn ∝ harmful hidden-gradient norm; only those layers train.

    Hyperparameters: rho (radius ρ, official 3), gamma (layers per draw γ, official 8; capped
    at the model's depth), switch_every (J, steps between draws, official 20).
    """

    rho: float = field(3.0, ge=0, doc="radius ρ of the perturbation of the sampled layers")
    gamma: int = field(8, ge=1, doc="number γ of layers perturbed and trained (min(γ, L))")
    switch_every: int = field(20, ge=1, doc="J: steps between layer draws (Gumbel noise held fixed)")

    cost_variants: ClassVar[dict[str, dict]] = {"g1": {"gamma": 1}, "g8": {"gamma": 8}}

    def streams(self) -> dict[str, StreamSpec]:
        """Alignment (refusals to defender-half harmful prompts) and harmful QA (scores)."""
        return {"alignment": StreamSpec("refusal", half="defender"),
                "harmful": StreamSpec("harmful_qa", half="defender")}

    def init(self, params, key):
        """(params, {"sampling_key": key data for the layer draws})."""
        return params, {"sampling_key": jax.random.key_data(key)}

    def active_layers(self, params, batches, frozen):
        """(active bool [L], p [L], harmful CE at δ = 0) for the step in batches[STEP] (default 0)."""
        cfg = self.require_cfg()
        l_harm, g_h = hidden_grads(cfg, params, batches["harmful"])
        p, _ = layer_probabilities(g_h)
        step = jnp.asarray(batches.get(STEP, 0), jnp.int32)
        key = jax.random.fold_in(jax.random.wrap_key_data(frozen["sampling_key"]), step // self.switch_every)
        return sample_layers(key, jax.lax.stop_gradient(p), min(self.gamma, cfg.num_layers)), p, l_harm

    def grad(self, params, batches, key, frozen):
        """Masked ∇_θ L(θ; ε_S) and UPDATE_MASK; metrics loss, l_clean, l_harm, hidden_grad_norm, p_l*, active_l*."""
        del key
        cfg, batch = self.require_cfg(), batches["alignment"]
        active, p, l_harm = self.active_layers(params, batches, frozen)
        clean, g = hidden_grads(cfg, params, batch, layer_mask=active)
        eps, norm = perturbation(g, self.rho)
        loss, grads = perturbed_grad(cfg, params, batch, eps)
        mask = layer_mask_tree(params, active)
        grads = jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), grads, mask)
        metrics = {"loss": loss, "l_clean": clean, "l_harm": l_harm, "hidden_grad_norm": norm}
        for i in range(cfg.num_layers):
            metrics[f"p_l{i}"] = p[i]
            metrics[f"active_l{i}"] = active[i].astype(jnp.float32)
        metrics[UPDATE_MASK] = mask
        return grads, metrics

"""T-Vaccine — targeted layer-wise Vaccine (Liu et al., arXiv 2410.09760).

Seed equations (seed 002, Lever 2):

    s_{l,t} = ‖∇_{e_{l,t}} L_{w_t}(e_{l,t}; x_h, y_h)‖₂,    p_{l,t} = s_{l,t} / Σ_{l'} s_{l',t}
    sample γ layers from P_t; Vaccine's perturbation on those layers only; the others frozen.

As implemented:

    s_l   = ‖∂L(θ; δ; harmful batch)/∂δ_l‖₂ at δ = 0      δ_l added to layer l's output
    p_l   = s_l / Σ s   (uniform if every s_l is 0)          at steps t with t mod K = 0
    S     = top-γ of (log p_l + G_l),  G ~ Gumbel(fold_in(sampling_key, t / J))
                                                             at steps t with t mod J = 0
    ε_l   = ρ·g_l/(‖g_S‖₂ + 1e-7) for l ∈ S    g_S = ∂L(θ; δ_S; alignment)/∂δ_S at δ_S = 0
    grads = ∇_{θ_S} L(θ; δ_S = ε_S) on the layers in S; 0 (and frozen) everywhere else

p and S are host state (`collect`, the loop's host phase before each step): p is refreshed from
the step's harmful batch every K = `probability_every` steps by a separate jitted pass (a
backward with respect to the hidden states only, every layer), S is redrawn every J =
`switch_every` steps from the current p, and both travel in batches[CARRY], which the loop
saves with each checkpoint, so a resumed run draws the same sets. S reaches the jitted step as
`batches[STATIC]` (an `objective.Static`): the step specialises on the set, one compilation per
distinct set, cached. With S static the step differentiates only what the set needs:

    h_lo   = layers 0..lo−1 of the frozen model on the embeddings    lo = min S (no backward)
    pass 1 = ∂/∂δ_S of the stack lo..L−1 with every weight constant  (activation backward only)
    pass 2 = ∂/∂θ_S of the same stack, the other layers' weights constant

so neither pass stores activations or runs a backward below lo, and no weight gradient is
computed outside S; the layers from lo up run as segments, each a `decoder_stack` layer range
chained through the residual stream (so the stack's activation sharding constraints and
`cfg.remat` apply; runs of layers in S take their weights from the differentiated θ_S).
`grads` is params-shaped (zeros outside S: the saving is in activations and backward work,
not in the grads or optimiser state) with UPDATE_MASK
keeping everything outside S bit-identical through the step (zero gradients alone would still
move them under AdamW's momentum and weight decay). Under the run's `lora` wrapper the mask
applies to the adapters of the layers outside S.

Gumbel top-γ draws S with the law of sequential sampling without replacement from p
(Plackett–Luce), which is what the official `np.random.choice(L, γ, replace=False, p=p)` does.
Metrics: loss (perturbed), l_clean, l_harm (harmful CE at δ = 0 at the last refresh),
hidden_grad_norm ‖g_S‖, p_l<i> and active_l<i> per layer.

The official code (`Lslland/T-Vaccine` `trainer.py` `BaseTrainer.training_step`,
`switch_active_layers`, `after_gradient_magnitude_step`; docs/research/anchors-methods.md §9)
and how this port differs:
- Schedule: official K = 200 (`probability_steps`), J = 20 (`lisa_interval_steps`), as here.
- Perturbation point: official hooks the attention module output of each layer (scores,
  ε and freezing all address those modules); here the layer output (see `vaccine`).
- Freezing: official sets requires_grad on the LoRA weights of the active layers' attention
  modules only; here (full-parameter training) every weight of the active layers trains and
  the embedding, final norm and head are frozen (training the embedding would need the full
  backward the method exists to avoid). optax's step count is global, whereas PyTorch AdamW's
  bias correction counts only a parameter's own steps.
- Official, for models with > 26 layers, also passes layer i−1 of each active layer i to its
  modified model forward (`inputs['activate_layers']`); not reproduced.
- The official harmful batch for the scores has batch size 1; here it is the harmful
  stream's batch at the refresh step. ρ = 3 (README), γ = 8 are the official defaults.
- Memory: official saves because autograd keeps neither activations nor weight gradients of
  frozen layers; here the step keeps no activations below lo and computes no weight gradient
  outside S (planned peak in `benchmarks.method_cost`), but the grads it returns and AdamW's
  state are full-sized, and the every-K score pass is a separate executable with Vaccine's
  pass-1 footprint. The saving grows with lo: a set whose lowest layer is 0 saves little.
- The step specialises on S: one compilation per distinct set met in the run (at most
  C(L, γ), in practice the few sets drawn every J steps).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdefense.config import field
from jaxdefense.data.specs import StreamSpec
from jaxdefense.errors import ConfigError
from jaxdefense.methods.vaccine import hidden_grads, perturbation
from jaxdefense.models.decoder import _nll_from_stack, decoder_stack
from jaxdefense.objective import CARRY, STATIC, STEP, UPDATE_MASK, Objective, Static
from jaxdefense.registry import register_method

SCORES = "layer_scores"


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


@functools.partial(jax.jit, static_argnums=0)
def harmful_scores(cfg, params, batch):
    """(p [L], harmful CE at δ = 0): the layer probabilities from ∂CE/∂δ of every layer."""
    l_harm, g = hidden_grads(cfg, params, batch)
    return layer_probabilities(g)[0], l_harm


@functools.partial(jax.jit, static_argnums=2)
def draw_layers(sampling_key, p, gamma: int, interval):
    """bool [L]: sample_layers with the key fold_in(sampling_key, interval)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(sampling_key), interval)
    return sample_layers(key, p, gamma)


def layer_mask_tree(params, active):
    """UPDATE_MASK for full params: layer leaves [L, ...] masked by `active` [L], the others False."""
    active = jnp.asarray(active)

    def layer_leaf(x):
        return active.reshape((active.shape[0],) + (1,) * (x.ndim - 1))

    return {k: (jax.tree.map(layer_leaf, v) if k == "layers" else jax.tree.map(lambda _: jnp.asarray(False), v))
            for k, v in params.items()}


def segments(layers: tuple[int, ...], num_layers: int) -> list[tuple[int, int, bool]]:
    """[(start, end, in S)] maximal runs of layers lo..L−1, lo = min(layers)."""
    chosen, out = set(layers), []
    for l in range(min(layers), num_layers):
        if out and out[-1][2] == (l in chosen):
            out[-1] = (out[-1][0], l + 1, out[-1][2])
        else:
            out.append((l, l + 1, l in chosen))
    return out


def set_loss(cfg, params, batch, layers: tuple[int, ...], sub, eps):
    """CE of `batch` with the layers in `layers` (sorted) taking weights `sub` (stacked [γ, ...])
    and adding eps [γ,B,T,D] to their outputs; every other weight is params' (constant). The
    layers below min(layers) run under stop_gradient. Each segment is a `decoder_stack` layer
    range (its sharding constraints and `cfg.remat`), chained through the residual stream."""
    ids, attention = batch["input_ids"], batch.get("attention_mask")
    lo = layers[0]
    x = None
    if lo > 0:
        x = lax.stop_gradient(decoder_stack(cfg, params, ids, attention, layers=(0, lo))[0])
    chosen_params, j = {**params, "layers": sub}, 0
    for start, end, chosen in segments(layers, cfg.num_layers):
        if chosen:
            n = end - start
            x = decoder_stack(cfg, chosen_params, ids, attention, hidden_perturb=eps, start_hidden=x,
                              layers=(j, j + n))[0]
            j += n
        else:
            x = decoder_stack(cfg, params, ids, attention, start_hidden=x, layers=(start, end))[0]
    nll, weights = _nll_from_stack(cfg, params, x, ids, batch["loss_mask"])
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@register_method("t_vaccine")
@dataclasses.dataclass(frozen=True)
class TVaccine(Objective):
    """T-Vaccine: Vaccine on γ layers drawn ∝ harmful hidden-gradient norm; only those layers train.

    Hyperparameters: rho (radius ρ, official 3), gamma (layers per draw γ, official 8; capped
    at the model's depth), switch_every (J, steps between draws, official 20),
    probability_every (K, steps between refreshes of p, official 200).
    """

    rho: float = field(3.0, ge=0, doc="radius ρ of the perturbation of the sampled layers")
    gamma: int = field(8, ge=1, doc="number γ of layers perturbed and trained (min(γ, L))")
    switch_every: int = field(20, ge=1, doc="J: steps between layer draws")
    probability_every: int = field(200, ge=1, doc="K: steps between refreshes of the layer probabilities")

    collects: ClassVar[bool] = True
    cost_variants: ClassVar[dict[str, dict]] = {"g1": {"gamma": 1}, "g2": {"gamma": 2}, "g8": {"gamma": 8}}

    def streams(self) -> dict[str, StreamSpec]:
        """Alignment (refusals to defender-half harmful prompts) and harmful QA (scores)."""
        return {"alignment": StreamSpec("refusal", half="defender"),
                "harmful": StreamSpec("harmful_qa", half="defender")}

    def init(self, params, key):
        """(params, {"sampling_key": key data for the layer draws})."""
        return params, {"sampling_key": jax.random.key_data(key)}

    def next_carry(self, params, batches, frozen, carry):
        """The host state after step batches[STEP]: {"p", "l_harm", "layers"} with p refreshed
        every K steps and the layer set redrawn every J steps (both at the first step seen)."""
        cfg, step = self.require_cfg(), int(batches[STEP])
        carry = dict(carry) if carry else {}
        if "p" not in carry or step % self.probability_every == 0:
            p, l_harm = harmful_scores(cfg, params, batches["harmful"])
            carry.update(p=[float(x) for x in np.asarray(p)], l_harm=float(l_harm))
        if "layers" not in carry or step % self.switch_every == 0:
            active = draw_layers(frozen["sampling_key"], jnp.asarray(carry["p"], jnp.float32),
                                 min(self.gamma, cfg.num_layers), step // self.switch_every)
            carry["layers"] = [int(i) for i in np.flatnonzero(np.asarray(active))]
        return carry

    def collect(self, params, batches, key, frozen):
        """The alignment batch, the layer set as batches[STATIC], p and l_harm as row arrays under
        batches["layer_scores"], and the new batches[CARRY]; the harmful batch is consumed here."""
        del key
        carry = self.next_carry(params, batches, frozen, batches.get(CARRY))
        rows = np.shape(batches["alignment"]["input_ids"])[0]
        out = {name: b for name, b in batches.items() if name not in ("harmful", CARRY, STATIC)}
        dtype = jax.dtypes.canonicalize_dtype(np.float64)  # float32 unless x64 is enabled
        out[SCORES] = {"p": np.tile(np.asarray(carry["p"], dtype), (rows, 1)),
                       "l_harm": np.full((rows,), carry["l_harm"], dtype)}
        out[STATIC] = Static(tuple(carry["layers"]))
        out[CARRY] = carry
        return out

    def layer_set(self, batches) -> tuple[int, ...]:
        static = batches.get(STATIC)
        if not isinstance(static, Static):
            raise ConfigError("t_vaccine: batches lack the layer set (batches[STATIC]); run `collect` before `grad`")
        return tuple(sorted(static.value))

    def grad(self, params, batches, key, frozen):
        """∇_{θ_S} L(θ; ε_S) (params-shaped, zero outside S) and UPDATE_MASK; metrics loss, l_clean,
        l_harm, hidden_grad_norm, p_l*, active_l*."""
        del key, frozen
        cfg, batch, layers = self.require_cfg(), batches["alignment"], self.layer_set(batches)
        index = np.asarray(layers)
        every = len(layers) == cfg.num_layers  # the stack itself: no gather, no scatter
        sub = params["layers"] if every else jax.tree.map(lambda w: w[index], params["layers"])
        zeros = jnp.zeros((len(layers), *batch["input_ids"].shape, cfg.hidden_size), params["embed"].dtype)
        frozen_sub = lax.stop_gradient(sub)
        clean, g = jax.value_and_grad(lambda d: set_loss(cfg, params, batch, layers, frozen_sub, d))(zeros)
        eps, norm = perturbation(g, self.rho)
        eps = lax.stop_gradient(eps)
        loss, g_sub = jax.value_and_grad(lambda w: set_loss(cfg, params, batch, layers, w, eps))(sub)
        grads = {k: (g_sub if every else jax.tree.map(lambda w, gs: jnp.zeros_like(w).at[index].set(gs), v, g_sub))
                 if k == "layers" else jax.tree.map(jnp.zeros_like, v) for k, v in params.items()}
        active = np.zeros(cfg.num_layers, bool)
        active[index] = True
        p = batches[SCORES]["p"][0]
        metrics = {"loss": loss, "l_clean": clean, "l_harm": batches[SCORES]["l_harm"][0], "hidden_grad_norm": norm}
        for i in range(cfg.num_layers):
            metrics[f"p_l{i}"] = p[i]
            metrics[f"active_l{i}"] = jnp.float32(active[i])
        metrics[UPDATE_MASK] = layer_mask_tree(params, active)
        return grads, metrics

"""TAR — Tamper-Resistant Safeguards (Tamirisa et al., ICLR 2025, arXiv 2408.00761).

Seed equation (seed 002, Lever 1):

    min_θ  λ_TR · E_{attack∼A_train} [ L_TR(attack(θ); D_TR) ]  +  λ_retain · L_retain(θ; D_retain)

L_TR is the negative entropy of the outputs on forget data at the attacked weights.

As implemented (the official `tar_training_loop` with one sampled adversary per step):

    attack:  lr ∼ U(lrs), optimiser ∼ U(optimizers) (AdamW with decoupled weight decay, or SGD),
             with probability switch_prob a retain→forget switch at M = ⌊Beta(6, 3)·K⌋;
             θ_0 = θ, θ_{i+1} = step_i(θ_i) on the next adversary chunk (retain rows for i < M)
    w_{i+1}  = tr_scale · exp(λ_s·(i − (K−1)))   if (i+1) mod subsample = 0, else 0
    L_TR(θ') = −mean_{real tokens of B_forget} H(softmax(logits(θ'))),   H = −Σ_v p log p
    L_ret(θ) = CE(θ; B_retain) + mean_{l=0..L} mean_{real tokens} ‖h_l(θ) − h_l(θ_frozen)‖₂
    loss     = Σ_i w_{i+1} L_TR(θ_{i+1}) + λ_retain · L_ret(θ)
    grads    = Σ_i w_{i+1} ∇L_TR(θ_{i+1}) + λ_retain ∇L_ret(θ),  θ_{i+1} held constant   order="first" (official)
             = ∇loss through the K inner steps                                         order="exact" (ours)

Both come from `curvature.unrolled_grad` with `outer_weights` (L_TR is evaluated only where
w ≠ 0); the exact pass is a two-level rematerialised scan (carry memory O(√K·|θ|)). The
adversary (lr, optimiser, switch, M) is drawn from the `key` argument of `grad`, so a run is a
function of its seed; inside jit the lr is a traced scalar and the optimiser a `lax.switch`
over the static set. θ_frozen is the starting model (`init` returns it as `frozen`).
Adversary chunks are `adversary_batch_size` consecutive rows of the step's "adversarial"
(harmful QA) and "retain" batches, cycled over the K steps.

The official code (`rishub-tamirisa/tamper-resistance` `modules/training.py` `tar_training_loop`,
`inner_loop_step`, `schedule`; `modules/objectives.py`; `run_tar_bio.sh`; anchors-methods.md §6)
and how this port differs:
- Adversaries: official samples the type pile-bio / camel-bio / retain_forget_switch with
  probability 1/3 each (two forget corpora); here "harmful" (the adversarial stream) with
  probability 1 − switch_prob and the switch with switch_prob = 1/3. Official draws a fresh
  adversary batch (tar_adversary_batch_size 4) at every inner step; here the K steps cycle
  through the chunks of one batch per stream.
- Optimiser: official torch AdamW (its default weight decay 0.01), lr from {2e-6, 2e-5, 4e-5},
  constant schedule, K = 64; `optimizers` may add "sgd" (ours).
- L_TR: official `max_entropy_loss` averages the entropy over every position of the forget
  batch, padding included; here over the real tokens (prompt and response). The TR gradient
  after inner step i is scaled by 4.0·schedule(i, K, 0.0625)/num_tasks for (i+1) mod 4 = 0 with
  num_tasks 1 and `--unbounded` (run_tar_bio.sh), so no lower-bound check; the same here. The
  x_tr batch is sampled once per adversary (the "meta" loader): the "forget" stream here.
- L_retain: official `obj_model_mse_representations` (`--retain_representations`): CE on the
  retain batch plus the mean over the L+1 HF hidden states of the mean over all positions of
  the Euclidean distance ‖h − h_ref‖₂ (not squared, despite the name); here the mean is over
  real tokens, the hidden states are the embedding output and each layer's output with the
  last one final-normed as in HF, and the distance is √ with derivative 0 at 0 (θ = θ_frozen at
  the first step). Official h_ref comes from a separately loaded `retain_model_name` model;
  here from the starting weights. λ_retain = tar_retain_scale = 1.
- Official is first order (weights restored after the inner loop; no backprop through it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxdefense.config import field
from jaxdefense.curvature import tree_norm
from jaxdefense.curvature.unrolled import _safe_sqrt, unrolled_grad
from jaxdefense.data.specs import StreamSpec
from jaxdefense.errors import ConfigError
from jaxdefense.methods.mlac import row_chunks
from jaxdefense.models import forward, lm_loss, next_token_nll
from jaxdefense.models.decoder import rms_norm
from jaxdefense.objective import BATCH_KEYS, Objective
from jaxdefense.registry import register_method

ORDERS = ("first", "exact")
ADVERSARY_OPTIMIZERS = ("adamw", "sgd")


def negative_entropy(cfg, params, batch):
    """−mean over real tokens (attention_mask) of the entropy of the next-token distribution."""
    logits = forward(cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    mask = batch["attention_mask"].astype(jnp.float32)
    return -jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def hidden_states(cfg, params, batch):
    """(logits, HF-style hidden states [L+1, B, T, D]: embedding output, each layer's output, the last final-normed)."""
    logits, hidden = forward(cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"],
                             return_hidden=True)
    return logits, hidden.at[-1].set(rms_norm(hidden[-1], params["final_norm"], cfg.rms_norm_eps))


def representation_retain_loss(cfg, params, reference, batch):
    """(CE + mean_l mean_tokens ‖h_l − h_l^ref‖₂, (CE, distance term)) — official obj_model_mse_representations."""
    logits, hidden = hidden_states(cfg, params, batch)
    _, ref_hidden = hidden_states(cfg, jax.lax.stop_gradient(reference), batch)
    nll, weights = next_token_nll(logits, batch["input_ids"], batch["loss_mask"])
    ce = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    diff = hidden.astype(jnp.float32) - ref_hidden.astype(jnp.float32)
    dist = _safe_sqrt(jnp.sum(diff * diff, axis=-1))
    mask = batch["attention_mask"].astype(jnp.float32)
    rep = jnp.mean(jnp.sum(dist * mask, axis=(1, 2)) / jnp.maximum(jnp.sum(mask), 1.0))
    return ce + rep, (ce, rep)


def schedule_weights(steps: int, scale: float, lam: float, subsample: int) -> tuple[float, ...]:
    """w_0 … w_K of L_TR(θ_k): w_{i+1} = scale·exp(lam·(i − (K−1))) where (i+1) mod subsample = 0, else 0."""
    return (0.0,) + tuple(scale * math.exp(lam * (i - (steps - 1))) if (i + 1) % subsample == 0 else 0.0
                          for i in range(steps))


def _pad_to(batch: dict, length: int) -> dict:
    return {k: jnp.pad(batch[k], [(0, 0)] * (batch[k].ndim - 1) + [(0, length - batch[k].shape[-1])])
            for k in BATCH_KEYS}


@register_method("tar")
@dataclasses.dataclass(frozen=True)
class TAR(Objective):
    """TAR: grads = Σ_i w_i ∇L_TR(attack_i(θ)) + λ_retain ∇L_retain(θ) over one sampled adversary.

    Hyperparameters: steps (K), lrs, optimizers ("adamw" official, "sgd"), weight_decay, tr_scale,
    schedule_lambda, subsample, retain_weight, switch_prob, switch_alpha/switch_beta (Beta of M/K),
    adversary_batch_size (rows per inner step, 0 = all), order ("first" official | "exact"),
    remat_segment (inner steps per rematerialised segment of "exact"; None = round(√K)).
    """

    steps: int = field(64, ge=1, doc="inner adversary steps K")
    lrs: tuple[float, ...] = field((2e-6, 2e-5, 4e-5), doc="adversary learning rates, one drawn per step")
    optimizers: tuple[str, ...] = field(("adamw",), doc="adversary optimisers, one drawn per step: adamw | sgd")
    weight_decay: float = field(0.01, ge=0, doc="decoupled weight decay of the adversary (torch AdamW default)")
    tr_scale: float = field(4.0, ge=0, doc="tamper-resistance gradient scale")
    schedule_lambda: float = field(0.0625, doc="λ_s of the weight exp(λ_s·(i − (K−1)))")
    subsample: int = field(4, ge=1, doc="L_TR after every subsample-th inner step")
    retain_weight: float = field(1.0, ge=0, doc="λ_retain")
    switch_prob: float = field(1 / 3, ge=0, le=1, doc="probability of the retain→forget switching adversary")
    switch_alpha: float = field(6.0, gt=0, doc="Beta(α, β) of the switch point M/K")
    switch_beta: float = field(3.0, gt=0, doc="Beta(α, β) of the switch point M/K")
    adversary_batch_size: int = field(4, ge=0, doc="rows per inner step (0: the whole batch)")
    order: str = field("first", choices=ORDERS, doc="first: gradients at the adapted weights (official); exact")
    remat_segment: int | None = field(None, ge=1, doc="inner steps per remat segment (None: round(√K))")

    cost_variants: ClassVar[dict[str, dict]] = {"first": {"order": "first"}, "exact": {"order": "exact"}}

    def __post_init__(self):
        super().__post_init__()
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ConfigError(f"{self.name}.lrs: must be a non-empty list of positive learning rates, got {self.lrs}")
        bad = [o for o in self.optimizers if o not in ADVERSARY_OPTIMIZERS]
        if not self.optimizers or bad:
            raise ConfigError(f"{self.name}.optimizers: each must be one of {list(ADVERSARY_OPTIMIZERS)}, "
                              f"got {list(self.optimizers)}")
        if self.subsample > self.steps:
            raise ConfigError(f"{self.name}.subsample: {self.subsample} > steps ({self.steps}) leaves no L_TR term")

    def streams(self) -> dict[str, StreamSpec]:
        """Adversary data and the x_tr batch (harmful QA, defender half); retain text (LM loss on every token)."""
        return {"adversarial": StreamSpec("harmful_qa", half="defender"),
                "forget": StreamSpec("harmful_qa", half="defender"),
                "retain": StreamSpec("benign_instruct", loss_on="sequence")}

    def init(self, params, key):
        del key
        return params, {"reference": params}

    def ce(self, params, batch):
        return lm_loss(self.require_cfg(), params, batch)

    def tr_loss(self, params, batch):
        return negative_entropy(self.require_cfg(), params, batch)

    def weights(self) -> tuple[float, ...]:
        return schedule_weights(self.steps, self.tr_scale, self.schedule_lambda, self.subsample)

    def sample_adversary(self, key):
        """(lr, optimiser index, switch flag, M) drawn from `key`."""
        k_lr, k_opt, k_switch, k_m = jax.random.split(key, 4)
        lr = jnp.asarray(self.lrs, jnp.float32)[jax.random.randint(k_lr, (), 0, len(self.lrs))]
        opt = jax.random.randint(k_opt, (), 0, len(self.optimizers))
        switch = jax.random.bernoulli(k_switch, self.switch_prob)
        m = jnp.floor(jax.random.beta(k_m, self.switch_alpha, self.switch_beta) * self.steps).astype(jnp.int32)
        return lr, opt, switch, m

    def inner_batches(self, batches, switch, m) -> dict:
        """[K, rows, T] adversary chunks: retain chunks for steps k < M when `switch`, else harmful ones."""
        adv = row_chunks(batches["adversarial"], self.adversary_batch_size)
        ks = jnp.arange(self.steps)
        if self.switch_prob == 0:
            return jax.tree.map(lambda x: x[ks % x.shape[0]], adv)
        ret = row_chunks(batches["retain"], self.adversary_batch_size)
        rows = min(adv["input_ids"].shape[1], ret["input_ids"].shape[1])
        length = max(adv["input_ids"].shape[2], ret["input_ids"].shape[2])
        adv, ret = (_pad_to({k: x[:, :rows] for k, x in b.items()}, length) for b in (adv, ret))
        use_retain = switch & (ks < m)

        def pick(a, r):
            sel = use_retain.reshape((-1,) + (1,) * (a.ndim - 1))
            return jnp.where(sel, r[ks % r.shape[0]].astype(a.dtype), a[ks % a.shape[0]])

        return {k: pick(adv[k], ret[k]) for k in BATCH_KEYS}

    def grad(self, params, batches, key=None, frozen=None):
        """grads = Σ w ∇L_TR(θ_i) + λ_retain ∇L_retain(θ); metrics loss, l_tr, entropy_last, l_retain,
        l_retain_ce, l_retain_rep, adversary_lr, adversary_optimizer, adversary_switch, switch_step,
        inner_loss_first/last, grad norms."""
        missing = [s for s in ("adversarial", "forget", "retain") if s not in batches]
        if missing:
            raise ConfigError(f"{self.name}: needs streams {missing}, got {sorted(batches)}")
        if frozen is None or "reference" not in frozen:
            raise ConfigError(f"{self.name}: frozen must hold the reference model (call .init)")
        cfg = self.require_cfg()
        key = jax.random.key(0) if key is None else key
        lr, opt, switch, m = self.sample_adversary(key)
        inner = self.inner_batches(batches, switch, m)
        weights = self.weights()

        def attack(optimizer):
            return lambda: unrolled_grad(
                self.tr_loss, batches["forget"], self.ce, inner, params, steps=self.steps, lr=lr,
                optimizer=optimizer, weight_decay=self.weight_decay, outer_weights=weights,
                first_order=self.order == "first", remat_segment=self.remat_segment)

        if len(self.optimizers) == 1:
            l_tr, g_tr, aux = attack(self.optimizers[0])()
        else:
            l_tr, g_tr, aux = jax.lax.switch(opt, [attack(o) for o in self.optimizers])
        (l_ret, (ce, rep)), g_ret = jax.value_and_grad(
            lambda p: representation_retain_loss(cfg, p, frozen["reference"], batches["retain"]),
            has_aux=True)(params)
        grads = jax.tree.map(
            lambda a, b: (a.astype(jnp.float32) + self.retain_weight * b.astype(jnp.float32)).astype(a.dtype),
            g_tr, g_ret)
        last = max(i for i, w in enumerate(weights) if w != 0)
        metrics = {"loss": l_tr + self.retain_weight * l_ret, "l_tr": l_tr, "entropy_last": -aux["outer_losses"][last],
                   "l_retain": l_ret, "l_retain_ce": ce, "l_retain_rep": rep, "adversary_lr": lr,
                   "adversary_optimizer": opt.astype(jnp.float32), "adversary_switch": switch.astype(jnp.float32),
                   "switch_step": m.astype(jnp.float32),
                   "inner_loss_first": aux["inner_losses"][0], "inner_loss_last": aux["inner_losses"][-1],
                   "grad_norm_tr": tree_norm(g_tr), "grad_norm_retain": tree_norm(g_ret),
                   "grad_norm": tree_norm(grads)}
        return grads, metrics

"""SEAM — Self-Destructive Language Model (Wang, Zhu, Wang; arXiv 2505.12186).

Seed equations (seeds 000/004):

    L(θ)   = L_ul(θ) + α·L_up(θ) + β·L_sd(θ)
    L_ul   = −E_{D_adv} ℓ(f_θ, y)                    unlearning (gradient ascent on harmful QA)
    L_up   =  E_{D_aln} ℓ(f_θ, y)                    utility: harmful prompt → refusal
    L_sd   = cos(g_a, g_b),  g_a = ∇E_{D_adv}ℓ,  g_b = ∇E_{D_bgn}ℓ
    ∇̂L_sd = (1/ε)[(g_b(θ+ε(ḡ_a−cḡ_b)) − g_b)/‖g_b‖ + (g_a(θ+ε(ḡ_b−cḡ_a)) − g_a)/‖g_a‖]

The returned update direction is ∇L_ul + α∇L_up + β·∇̂L_sd: a gradient estimate, not the
gradient of a scalar. `gamma` > 0 adds γ·∇ℓ(benign) (the benign batch's CE, with g_b's mask): a
utility term that neither the paper nor the official code has (default 0). ∇̂L_sd comes from ``curvature.cosine_grad`` with estimator "forward"
(the seed/official one-sided difference, 4 gradient evaluations), "central" (6) or "exact"
(two forward-over-reverse HVPs, no ε).

What the official code (ZJUWYH/seam ``src/core/trainer.py``, ``SeamTrainer``) does, and how
this port follows it:
- Streams: "adversarial" (harmful prompt + harmful answer), "alignment" (the *same* prompts +
  refusals) and "benign" (benign instructions). The first two must be paired row by row and
  padded to one length (``jaxdefense.data.pairs.PairedBatches``).
- Token mask: the positions where the harmful and refusal ``input_ids`` differ. The harmful
  losses (L_ul, g_a) and L_up are masked CE over those positions (intersected with each
  sequence's real tokens and ``loss_mask``). Official harmful sequences are
  "Question: p\\nAnswer:\\n r" and refusal sequences are the bare refusal text, so there the
  mask covers nearly every position; here both share the formatted prompt, so the mask is
  the response positions that differ (the intended reading). Official ``masked_token_ce_loss``
  also zeroes the logits at positions whose own mask bit is 0, which makes the first differing
  target a constant log V; that quirk is not reproduced.
- L_ul (from RepNoise): with logits of the final layer and logit-lens logits
  lm_head(final_norm(h_i)) of every hidden state h_0..h_L (embedding output, each layer),
      L_ul = −log(1 + (CE_final + Σ_i CE_lens(h_i)) / (L+1)),
  i.e. the official sum over the final CE plus the L+1 hidden states, divided by the number
  of hidden states. HF's last hidden state is already final-normed, so the official last
  lens term normalises twice; ours is pre-norm (``forward(return_hidden=True)``), so its lens
  term equals CE_final and is taken as such (one vocabulary projection fewer).
  ``unlearning="log"`` drops the lens (−log(1+CE)); ``"ascent"`` is the paper's plain −CE.
- Vocabulary projections (``jaxdefense.models.vocab.masked_state_ce``): every CE here (the
  lens terms, CE_final, L_up, g_a, g_b) projects only the positions that carry a target
  (sorted to the front, all hidden states pooled, ``lens_chunk`` rows at a time under
  ``jax.checkpoint``), so no [B,T,V] logits exist; the official code projects every position
  of every hidden state. Same value up to summation order.
- One harmful forward: the decoder stack runs once on the harmful batch, its ``jax.vjp`` is
  pulled back twice (∂L_ul/∂h, then ∂CE_final/∂h_L for g_a), and the vocabulary heads are
  differentiated separately, so the lens backward runs once. With "log"/"ascent",
  ∇L_ul = f'(CE)·g_a. g_a (and g_b, which γ reuses) are handed to ``cosine_grad`` (``at=``)
  for the finite-difference estimators at the params' own dtype; "exact" (linearised
  gradients) and a float32 perturbation copy of low-precision params compute their own, and
  γ's term takes that g_b back from ``cosine_grad``'s aux (one benign gradient per step).
- g_b: CE on the benign batch over *all* real tokens (official labels = input_ids with pads
  at −100, so prompt tokens count); ``benign_full_sequence=False`` uses ``loss_mask`` instead.
- The same batches are used at θ and at the perturbed points; no gradient clipping; the
  logged loss is L_ul + α·L_up.

Defaults are the official config (ε 1e-3, α 1, β 0.01; AdamW 2e-5 cosine, warm-up 0.1 lives
in the training config). At small scale β = 0.01 is indistinguishable from β = 0 (pilot,
docs/research/pilot-seam-tiny.md: ∇cos with norm 1–10 is swamped by the CE terms); use
β ≥ 1 for the tiny/small models (configs/seam_tiny.yaml sets β = 1).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxdefense.config import field
from jaxdefense.curvature import cosine_grad, tree_norm, tree_vdot
from jaxdefense.data.specs import StreamSpec
from jaxdefense.errors import DataError
from jaxdefense.objective import Objective
from jaxdefense.registry import register_method
from jaxdefense.models.decoder import decoder_stack, logits_from_hidden, next_token_nll
from jaxdefense.models.vocab import DEFAULT_CHUNK, masked_state_ce

ESTIMATORS = ("forward", "central", "exact")
UNLEARNING = ("logit_lens", "log", "ascent")
PERTURB_DTYPES = (None, "float32", "float64")


def differing_mask(adversarial: dict, alignment: dict) -> jnp.ndarray:
    """float32 [B, T]: 1 where the paired harmful and refusal token ids differ, or where one of the
    two sequences has a real token and the other padding (so an EOS whose id equals the pad id
    still counts)."""
    a, b = adversarial["input_ids"], alignment["input_ids"]
    if a.shape != b.shape:
        raise DataError(
            f"SEAM streams 'adversarial' {tuple(a.shape)} and 'alignment' {tuple(b.shape)} must be "
            "paired batches of one shape (use jaxdefense.data.pairs.PairedBatches)"
        )
    differ = a != b
    if "attention_mask" in adversarial and "attention_mask" in alignment:
        differ = differ | ((adversarial["attention_mask"] > 0) != (alignment["attention_mask"] > 0))
    return differ.astype(jnp.float32)


def seam_loss_masks(adversarial: dict, alignment: dict) -> tuple[dict, dict]:
    """The two batches with loss_mask = differing positions ∧ real token ∧ given loss_mask."""
    diff = differing_mask(adversarial, alignment)

    def restrict(batch):
        mask = diff * batch["attention_mask"].astype(jnp.float32)
        if "loss_mask" in batch:
            mask = mask * batch["loss_mask"].astype(jnp.float32)
        return {**batch, "loss_mask": mask}

    return restrict(adversarial), restrict(alignment)


def full_sequence_mask(batch: dict) -> dict:
    """loss_mask over every real token that has a real predecessor (official benign CE)."""
    real = batch["attention_mask"].astype(jnp.float32)
    prev = jnp.pad(real[:, :-1], ((0, 0), (1, 0)))
    return {**batch, "loss_mask": real * prev}


def masked_ce(logits, input_ids, loss_mask):
    """Σ_{b,t≥1} m[b,t]·(−log p(ids[b,t] | logits[b,t−1])) / max(Σ m, 1), in float32."""
    nll, weights = next_token_nll(logits, input_ids, loss_mask)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def logit_lens(cfg, params, h):
    """lm_head(final_norm(h)) in float32 for one hidden state h [B, T, D]."""
    return logits_from_hidden(cfg, params, h)


def head_params(params: dict) -> dict:
    """The leaves the vocabulary projection reads: final_norm and embed (tied) or lm_head."""
    return {k: params[k] for k in ("final_norm", "embed", "lm_head") if k in params}


def unlearning_from_state_ce(state_ce, kind="logit_lens"):
    """L_ul from the masked CE of each hidden state [S] (the last is the model's output).

    "logit_lens": −log(1 + (CE_final + Σ_s CE_s)/S); "log": −log(1 + CE_final); "ascent": −CE_final.
    """
    ce = state_ce[-1]
    if kind == "logit_lens":
        return -jnp.log1p((ce + jnp.sum(state_ce)) / state_ce.shape[0])
    return -jnp.log1p(ce) if kind == "log" else -ce


def unlearning_loss(cfg, params, batch, kind="logit_lens", *, chunk=DEFAULT_CHUNK):
    """(L_ul, CE_final) on the masked harmful batch; see the module docstring for ``kind``."""
    lens = kind == "logit_lens"
    x, hidden = decoder_stack(cfg, params, batch["input_ids"], batch["attention_mask"], return_hidden=lens)
    return unlearning_from_outputs(cfg, params, batch, None, hidden if lens else x[None], kind, chunk=chunk)


def unlearning_from_outputs(cfg, params, batch, logits, hidden, kind="logit_lens", *, chunk=DEFAULT_CHUNK):
    """`unlearning_loss` from one forward's outputs, for callers that need the same pass's hidden
    states (RepNoise).

    Args:
      logits: [B,T,V] final logits; read only when hidden is None ("log"/"ascent").
      hidden: [L+1,B,T,D] from ``forward(return_hidden=True)`` (for "log"/"ascent" only
        hidden[-1] is read); the CEs then project only the masked positions.
      chunk: rows per vocabulary projection (``models.vocab``).
    Returns:
      (L_ul, CE_final).
    """
    mask = batch["loss_mask"]
    if hidden is None:
        if kind == "logit_lens":
            raise ValueError("unlearning_from_outputs: kind 'logit_lens' needs the hidden states")
        ce = masked_ce(logits, batch["input_ids"], mask)
        return unlearning_from_state_ce(ce[None], kind), ce
    states = hidden if kind == "logit_lens" else hidden[-1:]
    state_ce = masked_state_ce(cfg, params, states, batch["input_ids"], mask, chunk=chunk)
    return unlearning_from_state_ce(state_ce, kind), state_ce[-1]


def _add_head_grads(grads: dict, head_grads: dict) -> dict:
    return {**grads, **{k: grads[k] + head_grads[k] for k in head_grads}}


def _combine(trees, weights):
    """Σ_i w_i·tree_i accumulated in float32 (or wider), cast to the first tree's dtypes."""
    def one(*xs):
        acc = jnp.promote_types(xs[0].dtype, jnp.float32)
        return sum(w * x.astype(acc) for w, x in zip(weights, xs)).astype(xs[0].dtype)
    return jax.tree.map(one, *trees)


@register_method("seam")
@dataclasses.dataclass(frozen=True)
class SEAM(Objective):
    """SEAM: grads = ∇L_ul + α∇L_up + β·∇̂cos(g_a, g_b); streams adversarial/alignment/benign.

    Hyperparameters: alpha (L_up weight), beta (L_sd weight), eps (finite-difference step),
    estimator ("forward" official | "central" | "exact"), unlearning ("logit_lens" official |
    "log" | "ascent"), benign_full_sequence (official True), perturb_dtype (None: the params'
    dtype, or float32 for bf16/f16 params; "float32"/"float64" force a copy in that dtype).
    """

    cost_variants: ClassVar[dict] = {"forward": {"beta": 1.0, "estimator": "forward"},
                                     "exact": {"beta": 1.0, "estimator": "exact"}}

    alpha: float = field(1.0, ge=0, doc="weight of L_up (refusal CE)")
    beta: float = field(0.01, ge=0, doc="weight of L_sd = cos(g_a, g_b)")
    eps: float = field(1e-3, gt=0, doc="finite-difference step (forward/central)")
    estimator: str = field("forward", choices=ESTIMATORS)
    unlearning: str = field("logit_lens", choices=UNLEARNING)
    benign_full_sequence: bool = field(True, doc="g_b over every real token (official) or loss_mask")
    perturb_dtype: str | None = field(None, choices=PERTURB_DTYPES)
    gamma: float = field(0.0, ge=0, doc="weight of a benign CE term γ·ℓ(benign) (not official; 0 = official)")
    lens_chunk: int = field(DEFAULT_CHUNK, ge=1, doc="rows (target position × hidden state) per vocabulary projection")

    def streams(self) -> dict[str, StreamSpec]:
        """Defender half of harmful_qa, the same prompts' refusals (paired), benign instructions."""
        return {"adversarial": StreamSpec("harmful_qa", half="defender"),
                "alignment": StreamSpec("refusal", pair_with="adversarial"),
                "benign": StreamSpec("benign_instruct")}

    def masked_batches(self, batches):
        """(harmful, refusal, benign) batches carrying SEAM's loss masks."""
        adversarial, alignment = seam_loss_masks(batches["adversarial"], batches["alignment"])
        benign = batches["benign"]
        if self.benign_full_sequence:
            benign = full_sequence_mask(benign)
        return adversarial, alignment, benign

    def ce_loss(self, params, batch):
        """Masked token CE ℓ (the attacker's loss): ∇ on the harmful batch is g_a, on benign g_b."""
        cfg = self.require_cfg()
        x, _ = decoder_stack(cfg, params, batch["input_ids"], batch["attention_mask"])
        return masked_state_ce(cfg, params, x[None], batch["input_ids"], batch["loss_mask"], chunk=self.lens_chunk)[0]

    def primary_loss(self, params, adversarial, alignment, benign=None):
        """L_ul + α·L_up (the official logged loss) [+ γ·ℓ(benign)], aux (L_ul, L_up, CE_final on harmful)."""
        l_ul, ce_adv = unlearning_loss(self.require_cfg(), params, adversarial, self.unlearning, chunk=self.lens_chunk)
        l_up = self.ce_loss(params, alignment)
        loss = l_ul + self.alpha * l_up
        if self.gamma:
            loss = loss + self.gamma * self.ce_loss(params, benign)
        return loss, (l_ul, l_up, ce_adv)

    def harmful_grads(self, params, adversarial, with_g_a=True):
        """(L_ul, CE_final, ∇L_ul, g_a or None) from one decoder pass over the harmful batch.

        The stack's ``jax.vjp`` is pulled back with ∂L_ul/∂h (and with ∂CE_final/∂h_L for g_a);
        the vocabulary heads' own gradients are added to those leaves.
        """
        cfg = self.require_cfg()
        ids, attn, mask = adversarial["input_ids"], adversarial["attention_mask"], adversarial["loss_mask"]
        lens = self.unlearning == "logit_lens"

        def stack(p):
            x, hidden = decoder_stack(cfg, p, ids, attn, return_hidden=lens)
            return hidden if lens else x[None]

        states, pull_stack = jax.vjp(stack, params)
        head = head_params(params)

        def ce_final(hd, x_last):
            return masked_state_ce(cfg, hd, x_last[None], ids, mask, chunk=self.lens_chunk)[0]

        def pull(d_head, d_states):
            return _add_head_grads(pull_stack(d_states)[0], d_head)

        if lens:
            def l_ul_fn(hd, st):
                state_ce = masked_state_ce(cfg, hd, st, ids, mask, chunk=self.lens_chunk)
                return unlearning_from_state_ce(state_ce, "logit_lens"), state_ce[-1]

            (l_ul, ce), (d_head, d_states) = jax.value_and_grad(l_ul_fn, argnums=(0, 1), has_aux=True)(head, states)
            g_ul = pull(d_head, d_states)
            if not with_g_a:
                return l_ul, ce, g_ul, None
            d_head_a, d_last = jax.grad(ce_final, argnums=(0, 1))(head, states[-1])
            return l_ul, ce, g_ul, pull(d_head_a, jnp.zeros_like(states).at[-1].set(d_last))
        ce, (d_head_a, d_last) = jax.value_and_grad(ce_final, argnums=(0, 1))(head, states[-1])
        g_a = pull(d_head_a, d_last[None])
        l_ul, slope = jax.value_and_grad(lambda c: unlearning_from_state_ce(c[None], self.unlearning))(ce)
        return l_ul, ce, _combine([g_a], [slope]), g_a if with_g_a else None

    def perturb_dtype_for(self, params):
        """The dtype finite differences perturb in: perturb_dtype, else float32 for sub-float32
        params (bf16 cannot hold θ + 1e-3·δ), else None (the params' own)."""
        if self.perturb_dtype is not None:
            return jnp.dtype(self.perturb_dtype)
        low = any(jnp.finfo(x.dtype).bits < 32 for x in jax.tree.leaves(params)
                  if jnp.issubdtype(x.dtype, jnp.floating))
        return jnp.dtype(jnp.float32) if low and self.estimator != "exact" else None

    def sd_grad(self, params, adversarial, benign, at=None):
        """(cos(g_a, g_b), ∇̂cos, aux) from curvature.cosine_grad with this estimator and ε.

        at: ((ℓ_adv, g_a), (ℓ_ben, g_b)) already computed at params (see `cosine_grad`).
        """
        return cosine_grad(
            self.ce_loss, adversarial, self.ce_loss, benign, params,
            estimator=self.estimator, eps=self.eps, perturb_dtype=self.perturb_dtype_for(params), at=at,
        )

    def grad(self, params, batches, key=None, frozen=None):
        """grads = ∇(L_ul + α·L_up [+ γ·ℓ_ben]) + β·∇̂L_sd; metrics l_ul, l_up, cos, gradient norms.

        g_b (γ's term and cosine_grad's) is computed once: here and handed to cosine_grad when
        shared (`at=`), else taken from cosine_grad's aux (its linearised pass for "exact")."""
        del key, frozen
        adversarial, alignment, benign = self.masked_batches(batches)
        share = self.beta == 0 or (self.estimator != "exact" and self.perturb_dtype_for(params) is None)
        l_ul, ce_a, g_ul, g_a = self.harmful_grads(params, adversarial, with_g_a=share)
        l_up, g_up = jax.value_and_grad(self.ce_loss)(params, alignment)
        if share:
            ce_b, g_b = jax.value_and_grad(self.ce_loss)(params, benign)
        if self.beta == 0:
            norm_a, norm_b = tree_norm(g_a), tree_norm(g_b)
            cos, norm_sd = tree_vdot(g_a, g_b) / (norm_a * norm_b), jnp.zeros(())
        else:
            cos, g_sd, aux = self.sd_grad(params, adversarial, benign,
                                          at=((ce_a, g_a), (ce_b, g_b)) if share else None)
            norm_a, norm_b, ce_a, ce_b, g_b = (aux[k] for k in ("norm_a", "norm_b", "loss_a", "loss_b", "grad_b"))
            norm_sd = tree_norm(g_sd)
        loss = l_ul + self.alpha * l_up
        if self.gamma:
            loss = loss + self.gamma * ce_b
            g_primary = _combine([g_ul, g_up, g_b], [1.0, self.alpha, self.gamma])
        else:
            g_primary = _combine([g_ul, g_up], [1.0, self.alpha])
        grads = g_primary if self.beta == 0 else _combine([g_primary, g_sd], [1.0, self.beta])
        metrics = {"loss": loss, "l_ul": l_ul, "l_up": l_up, "grad_norm_primary": tree_norm(g_primary),
                   "cos": cos, "grad_norm_a": norm_a, "grad_norm_b": norm_b, "grad_norm_sd": norm_sd,
                   "ce_attack": ce_a, "ce_benign": ce_b, "grad_norm": tree_norm(grads)}
        return grads, metrics

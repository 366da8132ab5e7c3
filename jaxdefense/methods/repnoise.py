"""RepNoise — Representation Noising (Rosati et al., NeurIPS 2024, arXiv 2405.14577).

Seed equation (docs/research/anchors-methods.md §13):

    L(θ) = CE_harmless(θ) + β·MMD(harmful representations of each layer, N(0, I))
           − α·log(1 + mean_l CE_logit-lens,l(harmful))                  β = 1e-3, α = 1

As implemented (the official `representation_noising/loss.py` `rep_noise_loss`):

    harmful  = harmful prompt + harmful answer (stream "adversarial", harmful_qa defender half)
    harmless = the same prompt + a refusal     (stream "alignment", paired row by row)
    m[b,t]   = 1 where the paired token ids differ (SEAM's `seam_loss_masks`: ∧ real token ∧ loss_mask)
    CE_harmless = masked token-mean CE of the harmless batch over m
    L_ul     = −log(1 + (CE_final + Σ_{i=0}^{L} CE_lens(h_i)) / (L+1))       SEAM's L_ul, one implementation
               (`seam.unlearning_from_outputs`), from the same forward pass as the representations
    r_l      = output of layer l's MLP on the harmful batch, [B,T,D], l = 1..L (representation="mlp")
    z_l      ~ N(0, I) of the same shape, one draw `jax.random.normal(key, [L,B,T,D])` from grad's key
    MMD_l    = MMD(flatten(r_l ⊙ m), flatten(z_l ⊙ m))                     one sample per sequence: [B, T·D]
    noise    = mean_l MMD_l
    loss     = CE_harmless + β·noise + α·L_ul,   grads = ∇loss

MMD (official `MMD_loss`, kernel_mul 2, kernel_num 5): over the 2B pooled samples with squared
distances d_ij, bandwidth σ = Σ_ij d_ij / ((2B)² − 2B) / kernel_mul^(kernel_num // 2), held
constant (the official `.data`: no gradient through σ), kernel k = Σ_{i<kernel_num}
exp(−d / (σ·kernel_mul^i)), MMD = mean(K_xx + K_yy − K_xy − K_yx) over the B×B blocks (the
biased estimate with the diagonals). Distances come from the Gram matrix (‖a‖² + ‖b‖² − 2a·b,
clamped at 0, diagonal exactly 0) rather than the official [2B, 2B, T·D] broadcast; σ has a
floor of the dtype's tiny so an all-masked batch gives MMD 0, not NaN.

Where the official code differs:
- It hooks `model.layers.{i}.mlp` (MLP outputs). The decoder here returns only the residual
  stream, so r_l = MLP(RMSNorm(h_l)) is recomputed from layer l's input h_{l−1} (its attention
  half and MLP again: about one more pass of the layers). representation="residual" uses the
  layer outputs h_1..h_L instead (no recomputation).
- Its mask is `harmful_ids != harmless_ids` over the whole padded row, so a harmful pad position
  facing a real refusal token counts; here only the harmful batch's real response tokens do.
  Its harmless sequences are the bare refusal text (no prompt) padded to 256 tokens, so its mask
  covers nearly every position; here both share the formatted prompt (the intended reading, as
  in SEAM's port). The logit-lens CE and its `masked_token_ce_loss` quirks are SEAM's (see
  jaxdefense/methods/seam.py).
- It projects every position of every hidden state onto the vocabulary; here every CE
  (CE_harmless, CE_final and the lens terms) projects only the target positions
  (`models.vocab.masked_state_ce`, as in SEAM), so no [B,T,V] logits exist: the same value up
  to the order of the sum.
- Its noise is `torch.randn_like` per layer at every step; here one draw per step from the
  step's key (the same distribution).
- The README calls the code incomplete and asks for a grid search over lr, α, β; the CTRAP repo's
  RepNoise baseline (loss_func/repnoise_loss.py, the same loss) runs α 10, β 1e-3 on LoRA.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from jaxdefense.config import field
from jaxdefense.curvature import tree_norm
from jaxdefense.data.specs import StreamSpec
from jaxdefense.methods.seam import UNLEARNING, seam_loss_masks, unlearning_from_outputs
from jaxdefense.models.decoder import (attend, causal_mask, decoder_stack, dense, mlp, positions_from_mask,
                                       project_qkv, rms_norm, rope_table)
from jaxdefense.models.vocab import masked_state_ce
from jaxdefense.objective import Objective
from jaxdefense.registry import register_method

REPRESENTATIONS = ("mlp", "residual")


def mmd(x, y, kernel_mul: float = 2.0, kernel_num: int = 5):
    """The official multi-bandwidth Gaussian-kernel MMD of samples x [n, F] and y [m, F] (see the
    module docstring), in ≥ float32, with no gradient through the bandwidth."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    total = jnp.concatenate([x, y], axis=0).astype(dtype)
    n = total.shape[0]
    sq = jnp.sum(total * total, axis=-1)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (total @ total.T), 0.0)
    dist = jnp.where(jnp.eye(n, dtype=bool), 0.0, dist)
    bandwidth = lax.stop_gradient(jnp.sum(dist)) / (n * n - n) / kernel_mul ** (kernel_num // 2)
    bandwidth = jnp.maximum(bandwidth, jnp.finfo(dtype).tiny)
    kernel = sum(jnp.exp(-dist / (bandwidth * kernel_mul ** i)) for i in range(kernel_num))
    b = x.shape[0]
    return jnp.mean(kernel[:b, :b] + kernel[b:, b:] - kernel[:b, b:] - kernel[b:, :b])


def noise_loss(reps, mask, noise, kernel_mul: float = 2.0, kernel_num: int = 5):
    """mean_l MMD(flatten(reps_l ⊙ m), flatten(noise_l ⊙ m)); reps, noise [L,B,T,D], mask [B,T]."""
    m = mask.astype(jnp.promote_types(reps.dtype, jnp.float32))[None, :, :, None]
    L, B = reps.shape[:2]
    x = (reps * m).reshape(L, B, -1)
    y = (noise.astype(m.dtype) * m).reshape(L, B, -1)
    return jnp.mean(jax.vmap(lambda a, b: mmd(a, b, kernel_mul, kernel_num))(x, y))


def mlp_outputs(cfg, params, hidden, attention_mask):
    """[L,B,T,D] MLP output of every layer, recomputed from each layer's input hidden[l]
    (hidden [L+1,B,T,D] from `decoder_stack(return_hidden=True)` without hidden_perturb)."""
    rope = rope_table(cfg, positions_from_mask(attention_mask))
    mask = causal_mask(attention_mask)

    def one(_, xs):
        p, x = xs
        q, k, v = project_qkv(cfg, p, rms_norm(x, p["attn_norm"], cfg.rms_norm_eps), rope)
        h = x + dense(attend(q, k, v, mask), p["wo"])
        return None, mlp(p, rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps))

    return lax.scan(one, None, (params["layers"], hidden[:-1]))[1]


@register_method("repnoise")
@dataclasses.dataclass(frozen=True)
class RepNoise(Objective):
    """RepNoise: grads = ∇[CE_harmless + β·mean_l MMD(r_l, N(0,I)) + α·L_ul]; streams adversarial/alignment.

    Hyperparameters: alpha (weight of the logit-lens ascent term, official 1), beta (MMD weight,
    official 1e-3), representation ("mlp" official: each layer's MLP output | "residual": each
    layer's output), unlearning (SEAM's kinds: "logit_lens" official | "log" | "ascent"),
    kernel_mul, kernel_num (the MMD's bandwidth ladder, official 2 and 5).
    """

    alpha: float = field(1.0, ge=0, doc="weight of L_ul = −log(1 + mean logit-lens CE on harmful)")
    beta: float = field(1e-3, ge=0, doc="weight of the MMD to N(0, I) of the harmful representations")
    representation: str = field("mlp", choices=REPRESENTATIONS, doc="mlp: MLP outputs (official); residual: layer outputs")
    unlearning: str = field("logit_lens", choices=UNLEARNING, doc="L_ul form (seam.unlearning_loss)")
    kernel_mul: float = field(2.0, gt=0, doc="ratio between successive MMD bandwidths")
    kernel_num: int = field(5, ge=1, doc="number of Gaussian kernels in the MMD")

    cost_variants: ClassVar[dict[str, dict]] = {"mlp": {"representation": "mlp"},
                                                "residual": {"representation": "residual"}}

    def streams(self) -> dict[str, StreamSpec]:
        """Defender half of harmful_qa and the same prompts' refusals (paired row by row)."""
        return {"adversarial": StreamSpec("harmful_qa", half="defender"),
                "alignment": StreamSpec("refusal", pair_with="adversarial")}

    def representations(self, params, batch, hidden):
        """[L,B,T,D] the harmful representations the MMD pulls toward N(0, I)."""
        if self.representation == "residual":
            return hidden[1:]
        return mlp_outputs(self.require_cfg(), params, hidden, batch["attention_mask"])

    def loss(self, params, adversarial, alignment, key):
        """(loss, aux) with aux = (CE_harmless, noise, L_ul, CE_final on harmful)."""
        cfg = self.require_cfg()
        _, hidden = decoder_stack(cfg, params, adversarial["input_ids"], adversarial["attention_mask"],
                                  return_hidden=True)
        l_ul, ce_harmful = unlearning_from_outputs(cfg, params, adversarial, None, hidden, self.unlearning)
        reps = self.representations(params, adversarial, hidden)
        noise = jax.random.normal(key, reps.shape, jnp.promote_types(reps.dtype, jnp.float32))
        l_noise = noise_loss(reps, adversarial["loss_mask"], noise, self.kernel_mul, self.kernel_num)
        x_harmless, _ = decoder_stack(cfg, params, alignment["input_ids"], alignment["attention_mask"])
        l_harmless = masked_state_ce(cfg, params, x_harmless[None], alignment["input_ids"], alignment["loss_mask"])[0]
        loss = l_harmless + self.beta * l_noise + self.alpha * l_ul
        return loss, (l_harmless, l_noise, l_ul, ce_harmful)

    def grad(self, params, batches, key, frozen=None):
        """∇loss; metrics loss, l_harmless, mmd, l_ul, ce_harmful, grad_norm."""
        del frozen
        adversarial, alignment = seam_loss_masks(batches["adversarial"], batches["alignment"])
        (loss, (l_harmless, l_noise, l_ul, ce_harmful)), grads = jax.value_and_grad(self.loss, has_aux=True)(
            params, adversarial, alignment, key)
        return grads, {"loss": loss, "l_harmless": l_harmless, "mmd": l_noise, "l_ul": l_ul,
                       "ce_harmful": ce_harmful, "grad_norm": tree_norm(grads)}

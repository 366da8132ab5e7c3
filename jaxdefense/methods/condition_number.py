"""Condition-number immunisation (Zheng, Bai, Bullins, Yeh; ICML 2025, arXiv 2505.23760).

Seed equations (seed 002, Lever 3), S a Gram (Hessian proxy) matrix with K rows:

    R_well(S) = ½‖S‖₂² − (1/2K)‖S‖_F²      on benign features: drives κ(S) towards 1
    R_ill(S)  = (1/2K)‖S‖_F² − ½‖S‖₂²      on harmful features: drives κ(S) up
    L(θ)      = L_task(θ) + λ_well·R_well(S_benign) + λ_ill·R_ill(S_harmful)

As implemented (the official `reg_loss`, which replaces R_ill by a reciprocal form):

    Φ        = hidden state h_layer [B, T, D] of the LLM at the rows' real tokens (tokens="all")
               or their response tokens (tokens="response"); rows masked out are zeros
    S        = ΦᵀΦ  [D, D]  (gram="sum", official), or ΦᵀΦ / N over the N selected tokens ("mean")
    σ_max, σ_min = extreme eigenvalues of S + jitter·I (σ_min over the eigenvalues > jitter)
    r1       = σ_max(S1)²/2 − ‖S1‖_F²/(2K)                       S1 from the benign batch, K = D
    r2       = 1 / (‖S2‖_F²/(2K) − σ_min(S2)²/2)                 S2 from the adversarial batch
    L        = CE(benign) + lam_r1·r1 + lam_r2·r2

r1 ≥ 0 with equality iff all eigenvalues of S1 are equal (up to the jitter); minimising r2
drives σ_min(S2) towards 0. The metrics report κ = σ_max/σ_min (and log κ, which the official
code logs) of both Gram matrices. `hessian_condition` estimates the condition number of a
loss's Gauss–Newton matrix by Lanczos (`curvature.spectra.condition_number`), for before/after
comparisons of the harmful and benign losses.

Eigenvalues in float64 (eig_dtype="float64", official `torch.linalg.eigvalsh` of the double
Gram matrix): under jax x64 the eigendecomposition runs in the graph; without x64 (the
default, float32 training) a jitted float32 graph cannot hold float64 values, so S is sent to
the host, decomposed by numpy in float64 (`jax.pure_callback`) and its eigenvalues come back in
S's dtype, with the exact eigenvalue gradient ∂λ_i/∂S = v_i v_iᵀ (`custom_vjp`).
eig_dtype="float32" decomposes in the graph in float32 (no host round trip).

The official code (`amberyzheng/model-immunization-cond-num` `models/model.py` `reg_loss`,
`utils/loss.py` `condition_number`; docs/research/anchors-methods.md §11) and how this port
differs:
- Official features are the output of a feature extractor followed by a linear (or
  classifier) head, and the task loss is the regression/classification loss on D1; no LLM
  setting exists. Here the features are one decoder layer's residual stream (`layer`, an
  index into the L+1 hidden states: 0 the embedding output, −1 the last layer's output before
  the final norm) and the task loss is the benign-instruction CE over response tokens.
- Official K is the input dimension (equal to the feature dimension in its linear setting);
  here K = D, the feature dimension.
- Official σ's come from S + 1e-6·I while the Frobenius norms use S itself: kept.
- Official defaults λ_r1 = 3e-6, λ_r2 = 3e8 (ViT on Cars) are tuned to that feature scale;
  the LLM configs here set their own (see configs/condition_number_tiny.yaml).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.config import field
from jaxdefense.curvature import condition_number as lanczos_condition_number
from jaxdefense.curvature import gnvp, tree_norm
from jaxdefense.data.specs import StreamSpec
from jaxdefense.errors import ConfigError
from jaxdefense.models import forward
from jaxdefense.models.decoder import decoder_stack, next_token_nll
from jaxdefense.objective import Objective
from jaxdefense.registry import register_method

JITTER = 1e-6  # official lambda_diag


def _host_eigh(s):
    w, v = np.linalg.eigh(np.asarray(s, np.float64))
    return w.astype(s.dtype), v.astype(s.dtype)


@jax.custom_vjp
def eigvalsh_host64(s):
    """Ascending eigenvalues of the symmetric s, computed by numpy in float64 on the host."""
    return _eigh_callback(s)[0]


def _eigh_callback(s):
    shapes = (jax.ShapeDtypeStruct(s.shape[:1], s.dtype), jax.ShapeDtypeStruct(s.shape, s.dtype))
    return jax.pure_callback(_host_eigh, shapes, s)


def _eigvalsh_fwd(s):
    w, v = _eigh_callback(s)
    return w, v


def _eigvalsh_bwd(v, w_bar):
    return ((v * w_bar[None, :]) @ v.T,)


eigvalsh_host64.defvjp(_eigvalsh_fwd, _eigvalsh_bwd)


def gram_eigvals(s, eig_dtype: str = "float64"):
    """Ascending eigenvalues of symmetric s: in the graph when s is float64 or eig_dtype is
    "float32", else float64 on the host (see the module docstring)."""
    if s.dtype == jnp.float64 or eig_dtype == "float32":
        return jnp.linalg.eigvalsh(s)
    return eigvalsh_host64(s)


def extreme_eigs(s, jitter: float = JITTER, eig_dtype: str = "float64"):
    """(σ_min, σ_max) of s + jitter·I, σ_min over the eigenvalues > jitter (official filter)."""
    w = gram_eigvals(s + jitter * jnp.eye(s.shape[0], dtype=s.dtype), eig_dtype)
    return jnp.min(jnp.where(w > jitter, w, jnp.inf)), jnp.max(w)


def r_well(s, sigma_max):
    """r1 = σ_max²/2 − ‖S‖_F²/(2K), K = S's size (the official well-conditioning term)."""
    return sigma_max**2 / 2 - jnp.sum(s * s) / (2 * s.shape[0])


def r_ill(s, sigma_min):
    """r2 = 1/(‖S‖_F²/(2K) − σ_min²/2) (the official ill-conditioning term)."""
    return 1.0 / (jnp.sum(s * s) / (2 * s.shape[0]) - sigma_min**2 / 2)


def feature_gram(hidden, mask, gram: str = "sum"):
    """S = ΦᵀΦ [D, D] in ≥ float32 over the tokens with mask 1 (hidden [B, T, D], mask [B, T]);
    divided by their number for gram="mean"."""
    dtype = jnp.promote_types(hidden.dtype, jnp.float32)
    m = mask.astype(dtype)
    phi = (hidden.astype(dtype) * m[..., None]).reshape(-1, hidden.shape[-1])
    s = phi.T @ phi
    return s / jnp.maximum(jnp.sum(m), 1.0) if gram == "mean" else s


def hessian_condition(cfg, params, batch, key, *, num_iters: int = 32, damping: float = 0.0):
    """(κ, λ_min, λ_max) of the Gauss–Newton matrix (+ damping·I) of the masked token-mean CE on
    `batch`, from `num_iters` Lanczos steps (`curvature.spectra.condition_number`: λ_max from
    below, λ_min from above, so κ is a lower bound that tightens with num_iters)."""

    def logits_fn(p, b):
        return forward(cfg, p, b["input_ids"], attention_mask=b["attention_mask"])[:, :-1]

    mask = batch["loss_mask"][:, 1:]

    def matvec(v):
        out = gnvp(logits_fn, params, batch, v, mask=mask)
        return jax.tree.map(lambda o, x: o + damping * x.astype(o.dtype), out, v)

    return lanczos_condition_number(matvec, params, key, num_iters=num_iters)


@register_method("condition_number")
@dataclasses.dataclass(frozen=True)
class ConditionNumber(Objective):
    """Condition-number immunisation: CE(benign) + λ_r1·r1(S_benign) + λ_r2·r2(S_harmful).

    Hyperparameters: lam_r1, lam_r2 (regulariser weights), layer (hidden state whose features
    form S), tokens ("all" real tokens | "response" tokens), gram ("sum" official | "mean"),
    jitter (added to S before the eigendecomposition), eig_dtype ("float64" official | "float32").
    """

    lam_r1: float = field(3e-6, ge=0, doc="weight of r1 (well-conditioning of benign features)")
    lam_r2: float = field(3e8, ge=0, doc="weight of r2 (ill-conditioning of harmful features)")
    layer: int = field(-1, doc="hidden state index in [−(L+1), L]: 0 embeddings, −1 the last layer")
    tokens: str = field("all", choices=("all", "response"), doc="tokens whose features enter S")
    gram: str = field("sum", choices=("sum", "mean"), doc="S = ΦᵀΦ (official) or ΦᵀΦ/N")
    jitter: float = field(JITTER, ge=0, doc="S + jitter·I before eigvalsh; σ_min over eigenvalues > jitter")
    eig_dtype: str = field("float64", choices=("float64", "float32"), doc="eigendecomposition precision")

    cost_variants: ClassVar[dict[str, dict]] = {"f64": {"eig_dtype": "float64"}, "f32": {"eig_dtype": "float32"}}

    def streams(self) -> dict[str, StreamSpec]:
        """Defender half of harmful_qa (features S2) and benign instructions (task loss, features S1)."""
        return {"adversarial": StreamSpec("harmful_qa", half="defender"),
                "benign": StreamSpec("benign_instruct")}

    def bind(self, cfg) -> ConditionNumber:
        n = cfg.num_layers + 1
        if not -n <= self.layer < n:
            raise ConfigError(f"method.layer: {self.layer} is outside [-{n}, {n - 1}] (the model's {n} hidden states)")
        return dataclasses.replace(self, cfg=cfg)

    def token_mask(self, batch):
        return batch["attention_mask"] if self.tokens == "all" else batch["loss_mask"]

    def gram_stats(self, s):
        """(σ_min, σ_max) of s + jitter·I."""
        return extreme_eigs(s, self.jitter, self.eig_dtype)

    def loss(self, params, batches):
        """(L, aux): L = CE(benign) + lam_r1·r1 + lam_r2·r2; aux the terms and the σ's."""
        cfg = self.require_cfg()
        benign, harmful = batches["benign"], batches["adversarial"]
        logits, hidden_b = forward(cfg, params, benign["input_ids"], attention_mask=benign["attention_mask"],
                                   return_hidden=True)
        nll, weights = next_token_nll(logits, benign["input_ids"], benign["loss_mask"])
        ce = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        _, hidden_h = decoder_stack(cfg, params, harmful["input_ids"], harmful["attention_mask"], return_hidden=True)
        s1 = feature_gram(hidden_b[self.layer], self.token_mask(benign), self.gram)
        s2 = feature_gram(hidden_h[self.layer], self.token_mask(harmful), self.gram)
        min1, max1 = self.gram_stats(s1)
        min2, max2 = self.gram_stats(s2)
        r1, r2 = r_well(s1, max1), r_ill(s2, min2)
        loss = ce + self.lam_r1 * r1 + self.lam_r2 * r2
        return loss, {"l_task": ce, "r1": r1, "r2": r2, "sigma_max_benign": max1, "sigma_min_benign": min1,
                      "sigma_max_harm": max2, "sigma_min_harm": min2}

    def grad(self, params, batches, key=None, frozen=None):
        """∇L; metrics loss, l_task, r1, r2, κ and log κ of both Gram matrices, grad_norm."""
        del key, frozen
        (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(params, batches)
        metrics = {"loss": loss, **aux}
        for side in ("benign", "harm"):
            hi, lo = aux[f"sigma_max_{side}"], aux[f"sigma_min_{side}"]
            metrics[f"kappa_{side}"] = hi / lo
            metrics[f"log_kappa_{side}"] = jnp.log(hi) - jnp.log(lo)
        metrics["grad_norm"] = tree_norm(grads)
        return grads, metrics

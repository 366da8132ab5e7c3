"""Gradient of the gradient cosine cos(∇L_a, ∇L_b) — SEAM's self-destructive loss L_sd.

With g_a = ∇L_a(θ), g_b = ∇L_b(θ), ĝ = g/‖g‖ and c = ⟨ĝ_a, ĝ_b⟩:

    ∇_θ c = H_a δ_a / ‖g_a‖ + H_b δ_b / ‖g_b‖,   δ_a = ĝ_b − c ĝ_a,   δ_b = ĝ_a − c ĝ_b.

Estimators (seed 000 "The Hessian-free trick"; seed 004 "Mechanism 3"; SEAM Theorem 1):
- "exact": the formula above with two exact HVPs. exact_via="linearize" (default): each
  stream is one `jax.linearize` of ∇L, so the gradient and the HVP share one pass: cost 2
  gradients + 2 tangent passes, but the residuals of both gradient computations are alive
  together. exact_via="jvp": 2 gradients, then jvp(∇L)(θ; δ) per stream, which recomputes
  each gradient (≈ +2 gradients of time) with the memory of one forward-over-reverse pass.
  An exact HVP's tangent pass costs ≈ 2 gradients of matmul FLOPs (each matmul y = xW
  becomes ẏ = ẋW + xẆ, and both backward matmuls double likewise), so "exact" needs
  ≈ 18 matmul units against the 4-gradient "forward" estimator's 12: ≈ 1.5× in FLOPs.
- "forward": SEAM's Hessian-free estimate, one-sided finite differences on the same batch,
  4 gradient evaluations:
      ∇̂ = (1/ε)·[ (g_b(θ + εδ_b) − g_b(θ))/‖g_b‖ + (g_a(θ + εδ_a) − g_a(θ))/‖g_a‖ ],
  error ≤ (ε/2)(L_a^H/‖g_a‖ + L_b^H/‖g_b‖) + O(ε²)  (Theorem 1; see spectra.seam_bound).
  As the official code (ZJUWYH/seam `SeamTrainer.training_step`) forms it: c =
  ⟨g_a, g_b⟩/(‖g_a‖‖g_b‖ + 1e-8), the perturbed point is θ + εδ rounded to the parameter
  dtype (the code adds ε·dir to bf16 weights in place), and the perturbed gradients use the
  same batches as g_a(θ), g_b(θ). The official code differs from this function only in
  scaling the result by β outside and in flattening all trainable parameters into one
  vector; the seed writes the δ_b term first, the code the δ_a term (same sum).
- "central": (g(θ + εδ) − g(θ − εδ))/(2ε) per stream, O(ε²) truncation error, 6 gradient
  evaluations; c without the 1e-8 stabiliser.

`perturb_dtype=jnp.float32` with bf16 params evaluates all finite-difference gradients
at float32 copies of the parameters, so an ε-sized perturbation survives rounding (bf16
cannot hold θ + 1e-3·δ: docs/research/feasibility.md §4). Norms and dots accumulate in
float32 (float64 for float64 params).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdefense.curvature._tree import (
    acc_dtype,
    tree_cast,
    tree_cast_like,
    tree_lincomb,
    tree_norm,
    tree_vdot,
)
from jaxdefense.curvature.hvp import hvp, linearize_grad, value_and_grad
from jaxdefense.errors import ConfigError

ESTIMATORS = ("exact", "forward", "central")
SEAM_COS_STABILISER = 1e-8


def _perturb(params, direction, step):
    """θ + step·δ formed in the accumulation dtype and rounded to each θ leaf's dtype."""
    return jax.tree.map(
        lambda p, d: (p.astype(acc_dtype(p.dtype)) + step * d.astype(acc_dtype(p.dtype))).astype(p.dtype),
        params,
        direction,
    )


def _difference(g_plus, g_minus, scale):
    """scale·(g₊ − g₋), subtracting in the accumulation dtype before scaling."""
    return jax.tree.map(
        lambda x, y: (x.astype(acc_dtype(x.dtype)) - y.astype(acc_dtype(y.dtype))) * scale,
        g_plus,
        g_minus,
    )


def cosine_grad(
    loss_a: Callable,
    batch_a,
    loss_b: Callable,
    batch_b,
    params,
    *,
    estimator: str = "exact",
    eps: float = 1e-3,
    perturb_dtype=None,
    has_aux: bool = False,
    exact_via: str = "linearize",
    at=None,
):
    """(cos, grad, aux): c = cos(∇L_a(θ), ∇L_b(θ)) and ∇_θ c (exactly or estimated).

    at: optional ((L_a, ∇L_a), (L_b, ∇L_b)) already computed by the caller at θ (cast to
    perturb_dtype when one is given), for a caller whose gradients share a pass with other
    work; used by "forward", "central" and exact_via="jvp" (not with has_aux).

    aux: loss_a, loss_b, norm_a (‖g_a‖), norm_b, dot (⟨g_a, g_b⟩), grad_a/grad_b (g_a, g_b
    at θ, for a caller that also needs them), and aux_a/aux_b from loss functions with
    has_aux. grad and grad_a/grad_b leaves have the params' dtypes ("exact") or
    `perturb_dtype` when given (finite differences).
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"cosine_grad estimator must be one of {ESTIMATORS}, got {estimator!r}")

    if exact_via not in ("linearize", "jvp"):
        raise ConfigError(f"cosine_grad exact_via must be 'linearize' or 'jvp', got {exact_via!r}")
    if at is not None and (has_aux or (estimator == "exact" and exact_via == "linearize")):
        raise ConfigError("cosine_grad at= needs has_aux=False and a finite-difference estimator or exact_via='jvp'")
    if at is not None:
        (loss_va, g_a), (loss_vb, g_b) = at
        aux_a = aux_b = None
        work = params if perturb_dtype is None else tree_cast(params, perturb_dtype)
        hvp_a = lambda v: hvp(loss_a, params, batch_a, v)
        hvp_b = lambda v: hvp(loss_b, params, batch_b, v)
    elif estimator == "exact" and exact_via == "linearize":
        loss_va, g_a, hvp_a, aux_a = linearize_grad(loss_a, params, batch_a, has_aux=has_aux)
        loss_vb, g_b, hvp_b, aux_b = linearize_grad(loss_b, params, batch_b, has_aux=has_aux)
    elif estimator == "exact":
        loss_va, g_a, aux_a = value_and_grad(loss_a, params, batch_a, has_aux=has_aux)
        loss_vb, g_b, aux_b = value_and_grad(loss_b, params, batch_b, has_aux=has_aux)
        hvp_a = lambda v: hvp(loss_a, params, batch_a, v, has_aux=has_aux)
        hvp_b = lambda v: hvp(loss_b, params, batch_b, v, has_aux=has_aux)
    else:
        work = params if perturb_dtype is None else tree_cast(params, perturb_dtype)
        loss_va, g_a, aux_a = value_and_grad(loss_a, work, batch_a, has_aux=has_aux)
        loss_vb, g_b, aux_b = value_and_grad(loss_b, work, batch_b, has_aux=has_aux)

    norm_a, norm_b, dot = tree_norm(g_a), tree_norm(g_b), tree_vdot(g_a, g_b)
    cos = dot / (norm_a * norm_b)
    c_dir = dot / (norm_a * norm_b + SEAM_COS_STABILISER) if estimator == "forward" else cos
    delta_a = tree_lincomb([1.0 / norm_b, -c_dir / norm_a], [g_b, g_a])
    delta_b = tree_lincomb([1.0 / norm_a, -c_dir / norm_b], [g_a, g_b])

    if estimator == "exact":
        h_a = hvp_a(delta_a)
        h_b = hvp_b(delta_b)
        grad = tree_cast_like(tree_lincomb([1.0 / norm_a, 1.0 / norm_b], [h_a, h_b]), params)
    else:
        grad_a = lambda p: value_and_grad(loss_a, p, batch_a, has_aux=has_aux)[1]
        grad_b = lambda p: value_and_grad(loss_b, p, batch_b, has_aux=has_aux)[1]
        if estimator == "forward":
            fd_a = _difference(grad_a(_perturb(work, delta_a, eps)), g_a, 1.0 / (eps * norm_a))
            fd_b = _difference(grad_b(_perturb(work, delta_b, eps)), g_b, 1.0 / (eps * norm_b))
        else:
            fd_a = _difference(
                grad_a(_perturb(work, delta_a, eps)),
                grad_a(_perturb(work, delta_a, -eps)),
                1.0 / (2 * eps * norm_a),
            )
            fd_b = _difference(
                grad_b(_perturb(work, delta_b, eps)),
                grad_b(_perturb(work, delta_b, -eps)),
                1.0 / (2 * eps * norm_b),
            )
        grad = tree_cast_like(jax.tree.map(jnp.add, fd_a, fd_b), work)

    aux = {"loss_a": loss_va, "loss_b": loss_vb, "norm_a": norm_a, "norm_b": norm_b, "dot": dot,
           "grad_a": g_a, "grad_b": g_b}
    if has_aux:
        aux["aux_a"], aux["aux_b"] = aux_a, aux_b
    return cos, grad, aux

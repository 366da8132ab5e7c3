"""Gradient of a one-step look-ahead objective (CTRAP's collapse term, Booster's h(w − αĝ)).

    F(θ) = L_out(θ − α·s(θ)),   s = g_h = ∇L_step(θ)        (CTRAP paper Eq. 2, seed 000)
                                s = g_h / (‖g_h‖ + η)        (normalize=True: official CTRAP
                                                               and Booster code, seed 002, η=1e-7)
    ∇F(θ) = (I − α J_s)ᵀ u,   u = ∇L_out(θ'),  θ' = θ − α s(θ)
      plain:      J_s = H_h                                ⇒ ∇F = u − α H_h u
      normalised: J_s = H_h/(n+η) − g gᵀH_h/(n(n+η)²)      ⇒ ∇F = u − α H_h w,
                  w = u/(n+η) − g⟨g, u⟩/(n(n+η)²),  n = ‖g_h‖  (H_h symmetric)

order="first" treats s as a constant (stop-gradient), which is what the official CTRAP
and Booster code do: ∇F ≈ u. Cost: 2 gradient evaluations (g_h at θ, u at θ').
order="exact": 2 gradient evaluations + 1 HVP of L_step at θ (g_h and the HVP share one
jax.linearize). The CTRAP step adds a third gradient (the alignment loss at θ) outside.
"""

from __future__ import annotations

from typing import Callable


from jaxdefense.curvature._tree import tree_cast_like, tree_lincomb, tree_norm, tree_vdot
from jaxdefense.curvature.hvp import linearize_grad, value_and_grad
from jaxdefense.errors import ConfigError

ORDERS = ("first", "exact")


def lookahead_grad(
    outer_loss: Callable,
    outer_batch,
    step_loss: Callable,
    step_batch,
    params,
    alpha,
    *,
    normalize: bool = False,
    order: str = "first",
    norm_eps: float = 1e-7,
    has_aux: bool = False,
):
    """(L_out(θ'), ∇F(θ), aux) for F(θ) = L_out(θ − α·s(θ)); see the module docstring.

    aux: step_loss (L_step(θ)), step_grad (g_h), step_grad_norm (‖g_h‖), and outer_aux/step_aux
    with has_aux.
    """
    if order not in ORDERS:
        raise ConfigError(f"lookahead_grad order must be one of {ORDERS}, got {order!r}")
    if order == "exact":
        step_value, g_h, hvp_h, step_aux = linearize_grad(step_loss, params, step_batch, has_aux=has_aux)
    else:
        step_value, g_h, step_aux = value_and_grad(step_loss, params, step_batch, has_aux=has_aux)

    norm = tree_norm(g_h)
    denom = norm + norm_eps if normalize else 1.0
    shifted = tree_cast_like(tree_lincomb([1.0, -alpha / denom], [params, g_h]), params)
    outer_value, u, outer_aux = value_and_grad(outer_loss, shifted, outer_batch, has_aux=has_aux)

    if order == "exact":
        if normalize:
            w = tree_lincomb([1.0 / denom, -tree_vdot(g_h, u) / (norm * denom**2)], [u, g_h])
        else:
            w = u
        grad = tree_cast_like(tree_lincomb([1.0, -alpha], [u, hvp_h(w)]), params)
    else:
        grad = u

    aux = {"step_loss": step_value, "step_grad": g_h, "step_grad_norm": norm}
    if has_aux:
        aux["outer_aux"], aux["step_aux"] = outer_aux, step_aux
    return outer_value, grad, aux

"""Model-agnostic second-order machinery: functions of `loss_fn(params, batch)`, never of models.

- hvp / linearized_hvp / gnvp: Hessian- and Gauss–Newton-vector products.
- cosine_grad: ∇cos(∇L_a, ∇L_b) exactly or by SEAM's finite differences.
- lookahead_grad: ∇L_out(θ − α·s(θ)) (CTRAP, Booster), first order or exact.
- unrolled_grad: through K inner SGD/Adam steps (MLAC, TAR), exact or FO-MAML.
- spectra: Lanczos eigenpairs, SLQ density, condition number, Hessian-Lipschitz, SEAM bound.
"""

from jaxdefense.curvature._tree import tree_norm, tree_vdot
from jaxdefense.curvature.cosine import ESTIMATORS, cosine_grad
from jaxdefense.curvature.hvp import HVP_MODES, gnvp, hvp, linearize_grad, linearized_hvp
from jaxdefense.curvature.lookahead import lookahead_grad
from jaxdefense.curvature.spectra import (
    condition_number,
    hessian_lipschitz,
    hessian_top_eigs,
    lanczos,
    lanczos_tridiag,
    seam_bound,
    slq_density,
    slq_quadrature,
)
from jaxdefense.curvature.unrolled import unrolled_grad

__all__ = [
    "ESTIMATORS",
    "HVP_MODES",
    "condition_number",
    "cosine_grad",
    "gnvp",
    "hessian_lipschitz",
    "hessian_top_eigs",
    "hvp",
    "lanczos",
    "lanczos_tridiag",
    "linearize_grad",
    "linearized_hvp",
    "lookahead_grad",
    "seam_bound",
    "slq_density",
    "slq_quadrature",
    "tree_norm",
    "tree_vdot",
    "unrolled_grad",
]

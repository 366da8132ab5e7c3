"""LoX — Low-Rank Extrapolation (Perin, Chen, Chen, Hirata, Wang, Hong; COLM 2025, arXiv 2506.15606).

Seed equation (seed 002, Lever 3), per weight matrix, ΔW = W_aligned − W_base = UΣVᵀ:

    W_LoX = W_base + α·U_kΣ_kV_kᵀ                     (form="seed"; α > 1 extrapolates)

As implemented: post hoc, no training (`trains = False`: `pipeline.fit` runs init → export →
HF directory). `model.path` is the aligned checkpoint, `method.base` the base one (an HF
directory or a run directory, resolved like `model.path`). For every matrix (every parameter
with two dimensions per layer: q/k/v/o, gate/up/down, the embedding and the untied head):

    SVD_k(ΔW) = U_kΣ_kV_kᵀ  (top-k singular triplets, float32; k = 0: ΔW itself, full rank)
    W_LoX     = W_aligned + coef·SVD_k(ΔW)            form="official"
              = W_base + alpha·SVD_k(ΔW)              form="seed"

Vectors (norm scales, biases) keep their aligned values in both forms. With k = 0 (or k ≥ the
matrix rank), form="seed" with alpha = 1 and form="official" with coef = 0 return the aligned
weights; the official form equals the seed form with alpha = 1 + coef at full rank, while at
k < rank the seed form also drops the part of ΔW outside its top-k subspace.

The official code (`VITA-Group/LoX` `safety/LoX.py`, docs/research/anchors-methods.md §12):
`W_aligned + coef·m` for every state-dict tensor with more than one dimension, m the SVD of
ΔW (float32, `full_matrices=False`) with singular values from k on zeroed, or ΔW itself for
k = 0; one-dimensional tensors keep the aligned values; both models load in bfloat16. Script
defaults k = 0, coef = 1 (the defaults here); the paper reports k = 6, α = 1.25 on Llama-2-7B.
Here the matrices are stored transposed ((in, out), per layer); SVD_k commutes with the
transpose, so the result is the same.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxdefense.config import field
from jaxdefense.errors import ConfigError
from jaxdefense.objective import Objective
from jaxdefense.registry import register_method

FORMS = ("official", "seed")


def low_rank(delta, k: int):
    """SVD_k(delta) over the last two axes (batched over the leading ones), in ≥ float32; delta for k = 0."""
    wide = delta.astype(jnp.promote_types(delta.dtype, jnp.float32))
    if k == 0 or k >= min(delta.shape[-2:]):
        return wide
    u, s, vt = jnp.linalg.svd(wide, full_matrices=False)
    return (u[..., :k] * s[..., None, :k]) @ vt[..., :k, :]


def extrapolate(aligned: dict, base: dict, *, k: int = 0, coef: float = 1.0, alpha: float = 1.25,
                form: str = "official") -> dict:
    """LoX of every matrix of `aligned` against `base` (same params layout); vectors stay aligned."""
    if form not in FORMS:
        raise ConfigError(f"lox form must be one of {FORMS}, got {form!r}")

    def one(path, a, b):
        matrix_dims = a.ndim - (1 if path[0].key == "layers" else 0)
        if matrix_dims < 2:
            return a
        m = low_rank(a - b, k)
        start, scale = (a, coef) if form == "official" else (b, alpha)
        return (start.astype(m.dtype) + scale * m).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(one, aligned, base)


@register_method("lox")
@dataclasses.dataclass(frozen=True)
class LoX(Objective):
    """LoX: training-free low-rank extrapolation of the alignment update ΔW = W_aligned − W_base.

    Hyperparameters: base (base checkpoint: HF or run directory), k (top singular directions,
    0 = full rank), form ("official": W_aligned + coef·SVD_k(ΔW) | "seed": W_base +
    alpha·SVD_k(ΔW)), coef, alpha.
    """

    base: str | None = field(None, doc="base (pre-alignment) checkpoint: an HF directory or a run directory")
    k: int = field(0, ge=0, doc="rank of the extrapolated update (0: full rank)")
    form: str = field("official", choices=FORMS, doc="official: W_aligned + coef·Δ_k; seed: W_base + alpha·Δ_k")
    coef: float = field(1.0, doc="extrapolation coefficient of the official form")
    alpha: float = field(1.25, doc="extrapolation factor of the seed form (paper: 1.25 with k = 6)")

    trains: ClassVar[bool] = False

    def streams(self) -> dict:
        return {}

    def load_base(self, dtype):
        """The base checkpoint's (ModelConfig, params) in `dtype`."""
        from jaxdefense.models import load_hf
        from jaxdefense.pipeline import model_dir

        if not self.base:
            raise ConfigError("method.base: required (the base checkpoint: an HF directory or a run directory)")
        try:
            return load_hf(model_dir(self.base), dtype=dtype)
        except ConfigError as e:
            raise ConfigError(f"method.base: {e}".replace("model.path: ", "")) from e

    def init(self, params, key):
        """(the extrapolated params, None); the base checkpoint must share the aligned model's config."""
        del key
        self.require_cfg()
        _, base = self.load_base(jax.tree.leaves(params)[0].dtype)
        shapes = jax.tree.map(jnp.shape, params)
        if jax.tree.structure(base) != jax.tree.structure(params) or jax.tree.map(jnp.shape, base) != shapes:
            raise ConfigError(f"method.base: {self.base!r} has other weights or shapes than the model at model.path")
        return jax.jit(lambda a, b: extrapolate(a, b, k=self.k, coef=self.coef, alpha=self.alpha,
                                                form=self.form))(params, base), None

    def grad(self, params, batches, key, frozen):
        raise ConfigError("lox trains nothing: its weights are computed in init (pipeline.fit skips training)")

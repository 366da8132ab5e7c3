"""Defences, one file each; `METHODS` maps a name to its class, `get_method` builds one.

A method is a frozen dataclass (``cfg`` + hyperparameters) with ``streams`` and
``grad(params, batches, key) -> (grads, metrics)``; see ``methods.base``.
"""

from jaxdefense.methods.base import METHODS, Method, get_method, hyperparameter_names, register_method
from jaxdefense.methods.seam import SEAM

__all__ = ["METHODS", "Method", "SEAM", "get_method", "hyperparameter_names", "register_method"]

"""Defences, one file each; `METHODS` maps a name to its class, `get_method` builds one.

A method is a frozen dataclass of hyperparameters with `streams`, `init`, `grad` and `export`
(`jaxdefense.objective.Objective`), registered with `@register_method(name)`.
"""

from jaxdefense.methods.base import METHODS, get_method, hyperparameter_names, register_method
from jaxdefense.methods.seam import SEAM
from jaxdefense.methods.sft import SFT
from jaxdefense.objective import Objective

Method = Objective

__all__ = ["METHODS", "Method", "Objective", "SEAM", "SFT", "get_method", "hyperparameter_names", "register_method"]

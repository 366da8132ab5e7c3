"""Refusal detection: re-exported from `jaxdefense.data.refusal` (the one matcher; see there)."""

from jaxdefense.data import refusal as _one
from jaxdefense.data.refusal import *  # noqa: F401,F403

__all__ = list(_one.__all__)

"""Refusal detection: re-exported from `jaxdefense.data.refusal` (the one matcher; see there)."""

from jaxdefense.data.refusal import (
    GCG_REFUSAL_PREFIXES,
    JBB_REFUSAL_SUBSTRINGS,
    REFUSAL_SUBSTRINGS,
    REFUSAL_WINDOW,
    is_refusal,
    refusal_flags,
    refusal_rate,
)

__all__ = ["GCG_REFUSAL_PREFIXES", "JBB_REFUSAL_SUBSTRINGS", "REFUSAL_SUBSTRINGS", "REFUSAL_WINDOW", "is_refusal",
           "refusal_flags", "refusal_rate"]

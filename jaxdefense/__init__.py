"""jaxdefense: defences against harmful fine-tuning of open-weight LLMs, in JAX."""

from jaxdefense.errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    DataError,
    JaxDefenseError,
    NonFiniteError,
)

__version__ = "0.1.0"

"""Errors that reach the user as one line on stderr and exit code 2."""


class JaxDefenseError(Exception):
    """Base class: bad input from the user (config, checkpoint, data, CLI arguments)."""


class ConfigError(JaxDefenseError):
    """A config key, value or type is wrong; the message names the key."""


class DataError(JaxDefenseError):
    """A data source, file or record is wrong; the message names it."""


class CheckpointError(JaxDefenseError):
    """A checkpoint is missing, mis-shaped or uses a feature the port does not implement."""


class NonFiniteError(JaxDefenseError):
    """A loss or gradient became NaN/Inf; the message names the step and stream."""

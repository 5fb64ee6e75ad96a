"""User-facing error types.

Every error a user can cause (bad prompt, unknown preset, missing weights, ...)
is a :class:`ClipguideError`; the CLI prints its message on one line and exits
with code 2.  Anything else escaping is a bug.
"""


class ClipguideError(Exception):
    """Base class for errors caused by user input or the environment."""


class ConfigError(ClipguideError, ValueError):
    """A configuration value, prompt or command-line argument is invalid."""


class WeightsError(ClipguideError):
    """A weight file is missing, corrupt, of the wrong architecture or unsafe."""


class UnsafePickleError(WeightsError):
    """A pickle asked for a global outside the allow-list (possible code execution)."""

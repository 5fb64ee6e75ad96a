"""User-facing error types.

Every error a user can cause (bad prompt, unknown preset, missing weights, ...)
is a :class:`ClipguideError`; the CLI prints its message on one line and exits
with code 2.  Anything else escaping is a bug.
"""

import re

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # the CLI's exit codes: a user error; Ctrl-C (as a shell reports SIGINT)

LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")  # all that str.splitlines breaks at


def one_line(text: str) -> str:
    """``text`` with its line breaks escaped: a message quoting user data (a prompt, a file name,
    a damaged manifest) stays one line."""
    return LINE_BREAKS.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class ClipguideError(Exception):
    """Base class for errors caused by user input or the environment; its message is one line."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class ConfigError(ClipguideError, ValueError):
    """A configuration value, prompt or command-line argument is invalid."""


class WeightsError(ClipguideError):
    """A weight file is missing, corrupt, of the wrong architecture or unsafe."""


class UnsafePickleError(WeightsError):
    """A pickle asked for a global outside the allow-list (possible code execution)."""


class CheckpointError(ConfigError):
    """A run's checkpoint is missing, corrupt or does not fit the run (it is never used then)."""


class NonFiniteError(ClipguideError):
    """The loss or the latent of a run became NaN or infinite: the optimisation diverged."""

    def __init__(self, message: str, step: int | None = None, runs: list = ()):
        super().__init__(message)
        self.step, self.runs = step, list(runs)  # the step and the batch indices of the runs that diverged


class OutputError(ClipguideError, OSError):
    """An output file could not be written (full disk, no permission); the previous file is intact."""


def error_detail(e: Exception, limit: int = 200) -> str:
    """An exception's message on one line, shortened, for an error that quotes it."""
    return " ".join(str(e).split())[:limit]

"""Errors a user can act on, and the exit codes the command line maps them to.

Anything raised as `UserError` is shown as one line (problem + fix) without a traceback.
Everything else is a bug and keeps its traceback on stderr.
"""


class UserError(Exception):
    """A problem with the input or the request that the user can fix."""

    exit_code = 2

    def __init__(self, problem, fix=""):
        self.problem = problem
        self.fix = fix
        super().__init__(problem + (" " + fix if fix else ""))


class InputError(UserError):
    """Unreadable, malformed or unsuitable input file or argument."""


class ResourceError(UserError):
    """The run cannot fit the chosen device (memory or time)."""

    exit_code = 3


class Cancelled(Exception):
    """The run was cancelled by the caller."""

    exit_code = 130


# Documented in README.md ("Exit codes").
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = UserError.exit_code
EXIT_RESOURCE = ResourceError.exit_code
EXIT_CANCELLED = Cancelled.exit_code
EXIT_SOME_FAILED = 4  # a cohort run (`run --engine dask`) finished, but one or more files failed: see its manifest

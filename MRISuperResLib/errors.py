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


class OutputError(InputError):
    """An output could not be written completely (disk full, quota, permissions); nothing was replaced."""


class ResourceError(UserError):
    """The run cannot fit the chosen device (memory or time)."""

    exit_code = 3


class Cancelled(Exception):
    """The run was cancelled by the caller."""

    exit_code = 130


class Terminated(Cancelled):
    """The process was asked to stop (SIGTERM): cleaned up like a cancel, but told apart by its exit code."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process killed by it


# Documented in README.md ("Exit codes").
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = UserError.exit_code
EXIT_RESOURCE = ResourceError.exit_code
EXIT_CANCELLED = Cancelled.exit_code
# a folder run (plain or `--engine dask`) went to the end, but some of its files failed: see its `summary` event
# (and a cohort's manifest)
EXIT_SOME_FAILED = 4
EXIT_TERMINATED = Terminated.exit_code

"""The one error type for mistakes a user can fix.

The CLI prints a FacliError as a single line on stderr and exits with code 1; anything else is
a bug and keeps its traceback.
"""


class FacliError(Exception):
    """A user error: say what was expected, what was found, and how to fix it."""


class OutOfMemoryPlanError(FacliError):
    """The plan says the run does not fit on the hardware."""

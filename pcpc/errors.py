"""User-facing errors.

`UserError` is a mistake the user can fix (bad config, missing file, wrong
shape at a call, a compile target the compiler rejects). The CLI prints its
message on one line and exits with status 2; `--debug` shows the traceback
and the `details` (a compiler's full output, a worker's traceback). It
subclasses ValueError so library callers can catch it like any validation
error.
"""


class UserError(ValueError):
    """A mistake in the user's input; the message says what was expected."""

    def __init__(self, message: str = "", details: str = ""):
        super().__init__(message)
        self.details = details

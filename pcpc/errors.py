"""User-facing errors.

`UserError` is a mistake the user can fix (bad config, missing file, wrong
shape at a call). The CLI prints its message on one line and exits with
status 2; `--debug` shows the traceback. It subclasses ValueError so library
callers can catch it like any validation error.
"""


class UserError(ValueError):
    """A mistake in the user's input; the message says what was expected."""

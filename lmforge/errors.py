"""Errors a user can cause.

Anything raised as ``LmforgeError`` is a problem with the user's input (a missing file,
an unknown model name, a corrupt checkpoint, a prompt that does not fit). The CLI turns
it into one line on stderr and a non-zero exit; library callers can catch it.
"""


class LmforgeError(Exception):
    """A user-facing error with a message that explains what to do."""

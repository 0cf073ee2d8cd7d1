"""The project's error type: raised for bad input anywhere, printed by the CLI as one line and a non-zero
exit."""


class HSAEError(Exception):
    """A problem the user can fix; its message is the whole explanation, with no traceback."""

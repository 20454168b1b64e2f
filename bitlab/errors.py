"""The one error type users see: the CLI prints its message (no traceback) and exits non-zero."""


class BitlabError(Exception):
    """A problem with the user's input or environment, worded for the user.

    Messages name the culprit (file, row, field or key) so that the user can fix it without
    reading the source.
    """

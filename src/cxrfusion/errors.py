"""The one error type for user mistakes: the CLI prints its message on one line and exits 2."""


class CxrError(Exception):
    """A problem with the user's input (file, flag, data), not a bug.

    The message names the file or setting and the problem, on one line.
    """

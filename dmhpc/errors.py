"""The one exception type for bad input: the command line prints its message as one line and exits 1."""


class DmhpcError(Exception):
    """Bad input or state the user can fix. The message names the file or key and the problem."""

"""User-facing errors.

A :class:`MoelabError` is a mistake in the user's input (a file, a key, a value):
the CLI prints its message as one paragraph and exits with status 2, no traceback.
So does an ``OSError`` (a full disk, a read-only place, a path through a file): the CLI turns it
into one line naming the path and what to do (``moelab.cli``). Anything else is a bug and keeps its
traceback.
"""


class MoelabError(Exception):
    """An error in user input: the message names the file/key/value, what was expected and what was found."""


class DataError(MoelabError):
    """A data set is missing, corrupted, or in an unexpected format."""


class ConfigError(MoelabError):
    """An experiment config has an unknown key or a wrongly typed value."""

"""One error base for everything a user can fix: a config key, a data row, a model, a file.

The command line prints a :class:`TidpoError` as one line (``--debug``: the
traceback) and any other exception with its traceback, so a bug inside MLX
or tidpo-mlx is never disguised as a user error. Each kind also derives from
the built-in exception it replaces, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class TidpoError(Exception):
    """A problem in the user's input or environment; the message names the file, line or key."""


class ConfigError(TidpoError, ValueError):
    """A recipe or flag that names an unknown key, a bad type or a bad value."""


class DataError(TidpoError, ValueError):
    """Bad input data; the message names the file and line (or split and row)."""


class ModelError(TidpoError, ValueError):
    """A model that cannot be found, fetched or used; the message says which and why."""


class ConvertError(TidpoError, ValueError):
    """A checkpoint or adapter file that cannot be converted (malformed, unsupported, mismatched)."""


class TrainingError(TidpoError, RuntimeError):
    """Training stopped (non-finite loss, bad resume state, output folder in use); the message says where."""


class MissingFileError(TidpoError, FileNotFoundError):
    """A file or folder the user named does not exist."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

"""User errors: mistakes in what the user gave us, reported as one line and exit code 2.

A ``UserError`` (a config key, a data file or one of its rows, a checkpoint, a missing path)
is something the user can fix from the message alone, so every entry point turns it into
``error: <message>`` on stderr with no traceback (``launch/boundary.py``). Anything else is a
bug and keeps its traceback.

Messages name the file, row and field, and the key and the fix; a value quoted from the
user's input goes through :func:`quote` so that a megabyte field or a binary blob never
floods the terminal.
"""

from __future__ import annotations

from typing import Any

QUOTE_LIMIT = 200


class UserError(Exception):
    """Base of every error whose message alone tells the user what to fix.

    ``collective`` is True when every rank raises the same error for the same reason (a bad
    config, or a failure rank 0 broadcast to the others): only rank 0 reports those.
    """

    collective = False


class ConfigError(UserError, ValueError):
    """A config key with a wrong name, type or value. The message names the key."""

    collective = True


class DataError(UserError, ValueError):
    """A data file (or a row of it) that cannot be used. The message names file, row and field."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or not the one this run can use."""


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """repr() of a user-supplied value, cut to about ``limit`` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"

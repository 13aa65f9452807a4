"""Exceptions for problems the user can fix (bad params, bad files).

Entry points catch :class:`UserError`, print its message (one line per problem) and exit
non-zero without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: params, data files or checkpoints."""


class ConfigError(UserError):
    """One or more invalid params keys; every problem is listed at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CheckpointError(UserError):
    """A checkpoint directory is missing, corrupt or does not fit the model."""


class DataError(UserError):
    """A data file is unreadable, inconsistent, or a split came out empty."""

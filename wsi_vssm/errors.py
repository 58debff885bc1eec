"""User-facing errors. The CLI prints `str(err)` as one line and exits with `err.exit_code`, no traceback."""

from __future__ import annotations


class WsiVssmError(Exception):
    """Base of every error the CLI reports as one line (bad input, missing optional piece...)."""

    exit_code = 1


class UsageError(WsiVssmError):
    """A request that cannot be satisfied as stated (e.g. an unknown option value)."""


class MissingDependency(WsiVssmError):
    """An optional package is not installed; the message says how to install it."""

    def __init__(self, what: str, install: str):
        super().__init__(f"{what} is not installed; install it with: {install}")
        self.install = install

"""The project's error types. Imports nothing, so any module (and the launchers that run without
torch) can raise them, and ``common.cli.report_errors`` turns them into one line and an exit code."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment: reported as one ``error:`` line and a non-zero exit, no traceback."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigurationError(UserError):
    """Missing credentials, an unavailable device, an impossible option combination: exit 2."""

    exit_code = 2

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


class InputError(UserError):
    """A frame, image or video the predictor cannot use."""

    exit_code = 2


class DiskFullError(UserError):
    """No space left (or the quota is full) while writing a file; the previous file is kept."""

    exit_code = 1


class TrainingInterrupted(UserError):
    """Ctrl-C (SIGINT) or SIGTERM during training: exit 128 + signal number (130, 143)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, exit_code=128 + int(signum))
        self.signum = int(signum)

    def __reduce__(self):  # crosses process boundaries (a Modal job's error reaches the launcher)
        return type(self), (str(self), self.signum)


class NonFiniteLossError(UserError):
    """A NaN or infinite loss: training stops and the last good checkpoint stays as it was."""

    exit_code = 1

"""Command-line plumbing shared by the top-level scripts: error reporting and exit codes."""

from __future__ import annotations

import functools
import sys
from typing import Callable


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


def report_errors(main: Callable) -> Callable:
    """Decorate a script's ``main(args)``: UserError (and its subclasses) -> message + exit code.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper

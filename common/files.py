"""Small file-system and retry helpers shared by every module that writes or fetches data."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from common.errors import DiskFullError

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success fsync it and rename over ``path``.

    A crash or a kill at any point leaves either the old file or the new one, never half of one.
    The temporary name starts with '.' so dataset loaders and glob patterns never pick it up.
    The writer creates it with a plain ``open``, so the file gets the permissions the umask gives.
    A full disk (ENOSPC, EDQUOT) becomes one ``DiskFullError`` line; the previous file stays.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = "the previous file is kept" if final.exists() else "nothing was written"
        raise DiskFullError(f"no space left on the device writing {final} ({kept}); "
                            "free some space and run the command again") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def plain(value):
    """``value`` as JSON-like values, recursively: a Namespace or dict -> dict with str keys, tuples ->
    lists, numpy / torch scalars -> numbers, Paths and other objects -> str."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    return str(value)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries ``atomic_path`` left in ``folder`` when its writer was killed; returns
    how many were removed. A temporary whose writer (the pid in its name) is still running on this
    machine stays: another script may be writing into the same folder."""
    removed = 0
    for tmp in Path(folder).glob(".tmp-*"):
        if _writer_alive(tmp.name):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _writer_alive(name: str) -> bool:
    """Whether the process that named a temporary ``.tmp-<pid>-<file>`` is still running here."""
    pid = name.split("-")[1] if name.count("-") >= 2 else ""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def retry_with_backoff(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 2.0,
    max_delay: float = 60.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    describe: str = "operation",
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, waiting base_delay * 2**k (+ up to 10% jitter) between tries.

    The last exception is re-raised once ``attempts`` tries have failed.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on as exc:
            if attempt == attempts:
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            delay *= 1.0 + 0.1 * random.random()
            print(f"warning: {describe} failed ({exc}); retry {attempt}/{attempts - 1} in {delay:.1f}s")
            (sleep or time.sleep)(delay)
    raise AssertionError("unreachable")

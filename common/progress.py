"""Progress display that suits where the output goes.

A terminal or a notebook gets a tqdm bar. A log file (CI, Modal, ``nohup``) gets no carriage
returns: a plain line at most every ``PLAIN_SECONDS`` for work that takes longer than that, and
a last line when it ends.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm  # widgets in a notebook, text in a terminal

PLAIN_SECONDS = 30.0


def interactive() -> bool:
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class PlainProgress:
    """The part of tqdm's interface the project uses (``n``, ``total``, ``update``, a context),
    writing one line per ``PLAIN_SECONDS`` instead of redrawing a bar."""

    def __init__(self, total: int | None, desc: str, unit: str = "it"):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.start = self.last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.monotonic()
        if now - self.last >= PLAIN_SECONDS:
            self._line(now)
            self.last = now

    def _line(self, now: float) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        units = self.unit + ("es" if self.unit.endswith(("ch", "s")) else "s")
        print(f"{self.desc}: {self.n}{of} {units}, {now - self.start:.0f}s", file=sys.stderr, flush=True)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.last != self.start:  # it printed before: say where it ended
            self._line(time.monotonic())


def progress_bar(total: int | None, desc: str, unit: str = "it", leave: bool = True):
    """A tqdm bar where one can be drawn, a ``PlainProgress`` elsewhere."""
    if interactive():
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return PlainProgress(total, desc, unit)


def progress(iterable, desc: str, total: int | None = None, unit: str = "it", leave: bool = True):
    """Iterate ``iterable`` with a ``progress_bar``."""
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    with progress_bar(total, desc, unit, leave) as bar:
        for item in iterable:
            yield item
            bar.update(1)

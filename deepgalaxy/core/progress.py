"""Progress bars for long work, the one place that builds them (tqdm), each one switchable off.

Every bar of the package comes from :func:`progress_bar`, so they all look alike: written to stderr (stdout stays
for results and tables), resized with the terminal, a Jupyter widget in a notebook (``tqdm.auto``). Switched off
(tests, worker ranks other than 0, ``--no-progress``) a bar is a silent stand-in with the same methods.
"""

from __future__ import annotations

import sys
from typing import Protocol


class ProgressBar(Protocol):
    """What callers use of a bar: advance it, show a few values beside it, close it."""

    def update(self, n: int = 1) -> object: ...

    def set_postfix(self, *, refresh: bool = True, **values: object) -> None: ...

    def close(self) -> None: ...


class NoBar:
    """A progress bar that shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *, refresh: bool = True, **values: object) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(
    enabled: bool, total: int, desc: str, unit: str = "img", *, initial: int = 0, leave: bool = True
) -> ProgressBar:
    """A bar over ``total`` units starting at ``initial`` (work done before a resume), or a silent stand-in when
    ``enabled`` is false. ``leave=False`` erases the bar when it closes (per-epoch bars of a training)."""
    if not enabled:
        return NoBar()
    from tqdm.auto import tqdm

    bar: ProgressBar = tqdm(
        total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=leave
    )
    return bar

"""Progress bars for long work that can also be switched off (tests, worker ranks other than 0)."""

from __future__ import annotations

from typing import Any


class NoBar:
    """A progress bar that shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "img") -> Any:
    """A tqdm bar over ``total`` units, or a silent stand-in when ``enabled`` is false."""
    if not enabled:
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit)

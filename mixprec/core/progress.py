"""Progress bars for long stages, via tqdm: shown on a terminal, silent when output is not a TTY.

tqdm is a well-kept dependency rather than a hand-written bar; `disable=None` is tqdm's own
"only on a TTY" switch, so CI logs and notebooks stay clean.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["progress"]

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None,
             enabled: bool | None = None) -> Iterator[T]:
    """Iterate `items` with a progress bar; `enabled=None` means only when stderr is a terminal."""
    disable = None if enabled is None else not enabled
    yield from tqdm(items, desc=desc, unit=unit, total=total, disable=disable, leave=False)

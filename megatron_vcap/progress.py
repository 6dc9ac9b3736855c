"""Progress bars for the long-running CLIs (``data synth``, ``data validate``, ``eval reward``).

One tqdm bar on stderr, shown only when stderr is a terminal (logs and pipes stay clean) and the
caller enables it (e.g. only the first rank of a distributed run).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    file: TextIO | None = None,
) -> Iterator[T]:
    """``items`` wrapped in a progress bar on ``file`` (default stderr) when ``enabled`` and the
    stream is a terminal (or ``file`` is given explicitly); otherwise ``items`` unchanged."""
    stream = file if file is not None else sys.stderr
    if not enabled or (file is None and not stream.isatty()):
        return iter(items)
    from tqdm import tqdm

    return iter(tqdm(items, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True))

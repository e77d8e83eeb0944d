"""Where long library steps report progress. The CLIs draw rich bars; the library default draws nothing.

Shared by rscurate's pipeline and rspretrain's probe, so one progress drawer serves both.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, name: str, total: float, unit: str) -> None: ...

    def advance(self, amount: float = 1) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    def start(self, name: str, total: float, unit: str) -> None:
        pass

    def advance(self, amount: float = 1) -> None:
        pass

    def finish(self) -> None:
        pass

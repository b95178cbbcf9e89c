"""Progress reporting without printing: library code calls a ``Progress``; the CLI renders it."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Progress:
    """No-op progress sink. The CLI subclasses it with rich progress bars."""

    def task(self, description: str, total: int | None) -> object:
        return None

    def advance(self, task: object, n: int = 1) -> None:
        pass

    def done(self, task: object) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if total is None:
            try:
                total = len(items)  # type: ignore[arg-type]
            except TypeError:
                total = None
        task = self.task(description, total)
        try:
            for item in items:
                yield item
                self.advance(task)
        finally:
            self.done(task)


NULL = Progress()


@contextlib.contextmanager
def nullctx():
    yield

"""Progress of the long phases (tracing, writing weights, verifying), reported to whoever
listens: the CLI draws bars, the library itself never prints. Any stage may import this.

    from onnxport import progress
    progress.update("writing weights", done, total)     # total None: no known end
    with progress.listening(fn): ...                     # fn(task, done, total)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Listener = Callable[[str, int, "int | None"], None]

_listener: ContextVar[Listener | None] = ContextVar("onnxport_progress", default=None)


def update(task: str, done: int, total: int | None = None) -> None:
    fn = _listener.get()
    if fn is not None:
        fn(task, done, total)


@contextlib.contextmanager
def listening(fn: Listener) -> Iterator[None]:
    token = _listener.set(fn)
    try:
        yield
    finally:
        _listener.reset(token)

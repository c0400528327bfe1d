"""Training loops built on the pure algorithms."""

from __future__ import annotations

from collections.abc import Callable

# Asked between steps of a long piece of training: True gives it up (`Interrupted`).
Stopping = Callable[[], bool]


def never() -> bool:
    """The `Stopping` of work nothing interrupts."""
    return False


class Interrupted(Exception):
    """Training given up part-way because its process is stopping: nothing of it was kept, and
    the data it was on stays uncommitted, so it is read again after the restart."""

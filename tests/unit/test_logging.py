"""Service logs: kafka-python's closed-socket race at shutdown is not logged as a crash, and
everything else from its selector still is."""

from __future__ import annotations

import logging
import sys

from rlhf.server import closed_socket_race


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except type(error):
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "kafka.net.selector",
        logging.ERROR,
        __file__,
        1,
        "Unhandled exception in task",
        (),
        exc_info,
    )


def test_a_task_on_a_closed_socket_is_dropped_other_errors_are_kept():
    assert not closed_socket_race(_record(ValueError("Invalid file descriptor: -1")))
    assert closed_socket_race(_record(ValueError("something else")))
    assert closed_socket_race(_record(KeyError("Invalid file descriptor: -1")))
    plain = logging.LogRecord("kafka.net.selector", logging.ERROR, __file__, 1, "x", (), None)
    assert closed_socket_race(plain)
    # the transport's read on a socket already set to None (a client closing meanwhile)
    gone = AttributeError("'NoneType' object has no attribute 'recv'")
    assert not closed_socket_race(_record(gone))
    assert closed_socket_race(_record(AttributeError("'Foo' object has no attribute 'recv'")))

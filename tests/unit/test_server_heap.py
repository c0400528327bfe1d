"""settle_heap: what a service built at start-up leaves the cycle collector's generations;
keep_heap: freed memory kept in the C heap for the next call."""

import gc
import subprocess
import sys
import weakref

import pytest

from rlhf import server
from rlhf.config import CommonConfig, ConfigError
from rlhf.server import M_MMAP_THRESHOLD, M_TOP_PAD, M_TRIM_THRESHOLD, keep_heap, settle_heap


class _Node:
    def __init__(self) -> None:
        self.me = self


def test_settle_heap_freezes_what_is_alive_and_collects_garbage_first():
    cycle = _Node()
    gone = weakref.ref(cycle)
    del cycle  # garbage only the collector can free: collected, not frozen for good
    tracked = len(gc.get_objects())
    try:
        settle_heap()
        assert gone() is None
        assert gc.get_freeze_count() >= tracked // 2
        assert len(gc.get_objects()) < tracked // 10
    finally:
        gc.unfreeze()


# keep_heap (RLHF_HEAP_KEEP_MB): freed memory stays in the C heap for the next call.

ROUNDS = """
import ctypes, resource, sys
from rlhf.server import keep_heap
kept = keep_heap(int(sys.argv[1]))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def one_round():  # a forward pass's pattern: 64 blocks of 1 MiB, written, then all freed
    blocks = [libc.malloc(1 << 20) for _ in range(64)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in blocks:
        libc.free(block)
one_round()  # the first round faults its memory in under any policy
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_round()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def _faults_per_round(megabytes: int) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS, str(megabytes)], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_a_kept_heap_reuses_freed_memory_instead_of_faulting_it_in_again():
    """64 MiB is 16,384 pages of 4 KiB. glibc's default returns the freed top of the heap to the
    OS, so every round faults it in again; with 256 MiB kept, later rounds reuse it."""
    kept, kept_faults = _faults_per_round(256)
    default, default_faults = _faults_per_round(0)
    assert (kept, default) == ("True", "False")
    assert default_faults > 8000, default_faults
    assert kept_faults < 500, kept_faults


class _Libc:
    """A C library's mallopt, recorded; `answer` is what it returns (1 = taken)."""

    def __init__(self, answer: int) -> None:
        self.calls: list[tuple[int, int]] = []

        def mallopt(parameter: int, value: int) -> int:
            self.calls.append((parameter, value))
            return answer

        self.mallopt = mallopt


def test_keep_heap_sets_trim_threshold_top_pad_and_mmap_threshold_together():
    libc = _Libc(1)
    assert keep_heap(256, libc)
    assert sorted(libc.calls) == [
        (M_MMAP_THRESHOLD, 32 << 20),
        (M_TOP_PAD, 64 << 20),
        (M_TRIM_THRESHOLD, 256 << 20),
    ]
    small = _Libc(1)
    assert keep_heap(8, small)
    assert (M_MMAP_THRESHOLD, 8 << 20) in small.calls  # blocks up to what is kept, not beyond
    untouched = _Libc(1)
    assert not keep_heap(0, untouched) and untouched.calls == []  # 0: glibc's own policy


def test_keep_heap_says_when_the_c_library_does_not_take_it():
    refusing = _Libc(0)  # musl's mallopt is a stub returning 0
    assert not keep_heap(256, refusing)
    assert len(refusing.calls) == 3  # every setting was still tried
    assert not keep_heap(256, object())  # no mallopt at all (macOS's libc)


def test_every_service_process_keeps_its_heap_as_configured(monkeypatch):
    """run_main applies RLHF_HEAP_KEEP_MB before the service builds its models."""
    applied: list[int] = []
    monkeypatch.setattr(server, "keep_heap", applied.append)
    monkeypatch.setattr(sys, "argv", ["rlhf-test"])
    monkeypatch.setenv("RLHF_HEAP_KEEP_MB", "96")

    def build(config: CommonConfig) -> server.Service:
        assert applied == [96]  # already kept when models are loaded
        raise ConfigError("stop here")

    with pytest.raises(SystemExit, match="stop here"):
        server.run_main("test", CommonConfig, build, "a test")
    assert applied == [96]
    monkeypatch.setenv("RLHF_HEAP_KEEP_MB", "4096")
    with pytest.raises(SystemExit):  # argparse's usage error: out of range
        server.run_main("test", CommonConfig, build, "a test")

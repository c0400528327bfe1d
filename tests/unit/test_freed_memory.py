"""Hot swaps hand the memory of the model they retire back to the system (`return_freed_memory`,
glibc's malloc_trim), instead of leaving it in the allocator's arenas for good."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import rlhf.serving as serving
from rlhf.checkpoints import REWARD, CheckpointStore
from rlhf.models import TINY, load_reward_backbone, reward_checkpoint_files
from rlhf.serving import CheckpointFollower, HotSwap, Served
from rlhf.v1 import events_pb2

# A model's worth of allocations made on a thread of its own (as checkpoint loads are), freed
# while small live allocations made between them stay: holes `free` alone never returns.
_ARENA_HOLES = textwrap.dedent(
    """
    import threading
    from rlhf.serving import return_freed_memory

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024

    kept, big = [], []
    def load():
        for _ in range(1500):
            big.append(b"x" * 100_000)  # below glibc's mmap threshold: from the arena
            kept.append(b"k" * 1_000)
    thread = threading.Thread(target=load)
    thread.start()
    thread.join()
    big.clear()
    freed = rss_mb()
    trimmed = return_freed_memory()
    print(freed, rss_mb(), trimmed)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas: Linux only")
def test_freed_model_memory_goes_back_to_the_system() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _ARENA_HOLES], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    freed, trimmed, called = result.stdout.split()
    assert called == "True"
    assert float(freed) - float(trimmed) > 100  # of the 150 MB freed


def _event(version: int, sha256: str, path: str) -> events_pb2.CheckpointEvent:
    return events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_REWARD, version=version, path=path, manifest_sha256=sha256
    )


def test_every_load_a_follower_makes_is_followed_by_a_trim(tmp_path, monkeypatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(serving, "return_freed_memory", lambda: trims.append(1) or True)
    store = CheckpointStore(tmp_path)
    files = reward_checkpoint_files(load_reward_backbone(TINY)[0])
    first, second = store.write(REWARD, *files), store.write(REWARD, *files)
    slot: HotSwap[str] = HotSwap(REWARD, Served("base", 0, "", 0.0))
    follower = CheckpointFollower(
        slot, store, lambda checkpoint: "model", "127.0.0.1:9", "unused", client_id="test"
    )
    assert follower.apply(_event(first.version, first.sha256, first.path))  # swapped
    assert len(trims) == 1
    assert not follower.apply(_event(second.version, "0" * 64, second.path))  # refused
    assert len(trims) == 2 and slot.current().version == first.version

"""Dynamic batching for serving: concurrent requests share one forward pass per decode step.

Requests queue up; a single worker thread takes up to `max_batch` of them (collecting
companions while they arrive less than `max_wait_s` apart), snapshots the served policy once for the
whole batch, and decodes them together. A hot swap therefore lands between batches: every request
finishes on the version its batch started with. The queue is bounded; a full queue is refused at
once (`Overloaded`) instead of growing latency without limit.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from rlhf import decoding
from rlhf.serving import HotSwap

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "rlhf_generation_batch_size", "requests decoded together", buckets=(1, 2, 4, 8, 12, 16, 32)
)
QUEUE_DEPTH = Gauge("rlhf_generation_queue_depth", "requests waiting for a batch")
TIME_TO_FIRST_TOKEN = Histogram(
    "rlhf_generation_time_to_first_token_seconds",
    "from enqueue to the first generated token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKENS = Counter("rlhf_generation_tokens_total", "tokens generated (rate() = tokens/s)")


class Overloaded(Exception):
    """The queue is full: the caller should answer RESOURCE_EXHAUSTED."""


class ShuttingDown(Exception):
    """The batcher is stopping and takes no new work."""


@dataclass
class Job:
    prompt_ids: list[int]
    sampling: decoding.Sampling
    # (token ids so far) -> True to stop; e.g. a stop sequence appeared in the text
    stop_check: Callable[[list[int]], bool] | None = None
    # (token, logprob) for each token as it is chosen, for streaming
    on_token: Callable[[int, float], None] | None = None
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


@dataclass(frozen=True)
class JobResult:
    completion: decoding.Completion
    policy_version: int
    batch_size: int


class DynamicBatcher:
    def __init__(
        self,
        policy: HotSwap,
        eos_ids: set[int],
        pad_id: int,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
    ) -> None:
        self._policy = policy
        self._eos_ids = eos_ids
        self._pad_id = pad_id
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._arriving = 0  # requests being validated and tokenised, about to be submitted
        self._arriving_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Refuse new work, finish what is queued and running, then return."""
        self._stopping.set()
        self._thread.join(timeout)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (validating, tokenising): a batch being collected waits
        for it rather than leaving it for the next batch."""
        with self._arriving_lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def submit(self, job: Job) -> Future:
        if self._stopping.is_set():
            raise ShuttingDown("the generation service is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full as exc:
            raise Overloaded(f"{self._queue.maxsize} requests already queued") from exc
        QUEUE_DEPTH.set(self._queue.qsize())
        return job.future

    def _next_batch(self) -> list[Job]:
        """The first waiting job plus every job that follows it closely.

        Collection goes on while companions keep arriving less than `max_wait_s` apart, or while
        requests are still being tokenised (handlers of a burst of clients take turns on the
        GIL), up to `max_batch` jobs or ten gaps in all, so a lone request waits one gap at most.
        """
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.perf_counter() + 10 * self.max_wait_s
        while len(batch) < self.max_batch:
            wait = min(self.max_wait_s, deadline - time.perf_counter())
            try:
                batch.append(
                    self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                if self._arriving > 0 and time.perf_counter() < deadline:
                    continue
                break
        QUEUE_DEPTH.set(self._queue.qsize())
        return batch

    def _run(self) -> None:
        while not (self._stopping.is_set() and self._queue.empty()):
            batch = self._next_batch()
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        served = self._policy.current()  # one version for the whole batch
        BATCH_SIZE.observe(len(batch))

        def on_token(row: int, token: int, logprob: float) -> None:
            job = batch[row]
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
                TIME_TO_FIRST_TOKEN.observe(job.first_token_at - job.enqueued_at)
            if job.on_token is not None:
                try:
                    job.on_token(token, logprob)
                except Exception:  # a vanished stream reader must not fail its batch-mates
                    log.exception("token callback failed; the request keeps decoding")

        def stop_check(row: int, token_ids: list[int]) -> bool:
            check = batch[row].stop_check
            return check is not None and check(token_ids)

        try:
            completions = decoding.generate(
                served.model,
                [job.prompt_ids for job in batch],
                [job.sampling for job in batch],
                self._eos_ids,
                self._pad_id,
                stop_check=stop_check,
                on_token=on_token,
            )
        except Exception as exc:  # a failed batch fails its requests, not the service
            log.exception("decoding a batch of %d failed", len(batch))
            for job in batch:
                job.future.set_exception(exc)
            return
        for job, completion in zip(batch, completions, strict=True):
            TOKENS.inc(len(completion.token_ids))
            job.future.set_result(JobResult(completion, served.version, len(batch)))

"""Reward scoring for serving: normalised scores, one forward pass per dynamic batch.

`ScoreBatcher` coalesces concurrent requests: callers queue their pairs and wait; one worker
thread takes the oldest request and every request queued behind it that still fits in
`max_batch` pairs and scores them all in one forward pass. It waits for companions (at most
`max_wait_s`, counted from the oldest request's arrival) only while another call is on its way
(`arriving`: received, not yet queued); a lone caller is never held back. Under load requests
pile up while the model is busy, so batches fill without waiting. A request is never split, and
the queue is bounded (`Overloaded`) so latency cannot grow without limit.

Every forward pass runs on the worker thread, a lone call's too: the hand-off costs tens of
microseconds, while torch ops run from several threads make libgomp stop spinning between ops
(see `rlhf.models.on_own_thread`), which on 2 cores doubled a small pass.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from prometheus_client import Gauge, Histogram
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.algorithms.reward import normalise
from rlhf.batching import Overloaded, ShuttingDown  # the one pair of refusals for batchers
from rlhf.models import encode_reward_inputs, reward_normalisation
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)

BATCH_PAIRS = Histogram(
    "rlhf_reward_batch_pairs",
    "pairs scored in one forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_REQUESTS = Histogram(
    "rlhf_reward_batch_requests",
    "requests coalesced into one forward pass",
    buckets=(1, 2, 4, 8, 16, 32),
)
QUEUED_PAIRS = Gauge("rlhf_reward_queued_pairs", "pairs waiting for a forward pass")
FORWARD_SECONDS = Histogram(
    "rlhf_reward_forward_seconds",
    "one dynamic batch scored (tokenise, forward pass, normalise); a Score call's latency "
    "(rlhf_grpc_request_seconds) beyond it is queueing and the call's own work",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

PromptResponse = tuple[str, str]
# Scores a batch of (prompt, response) pairs; returns one score per pair and the model version.
BatchScorer = Callable[[list[PromptResponse]], tuple[list[float], int]]


def reward_prompt(generation: events_pb2.GenerationEvent) -> str:
    """The prompt text the reward model sees: the user's words without the chat template.

    The template (system prompt, role markers) is the same for every answer and only spends the
    reward model's token budget. A one-turn chat is its message; a longer one is "role: content"
    lines; a plain-prompt generation is its prompt. Training, PPO scoring and drift sampling
    all use this, so the reward model is always asked the way it was taught.
    """
    turns = [m for m in generation.messages if m.role != "system"]
    if len(turns) == 1:
        return turns[0].content
    if turns:
        return "\n".join(f"{m.role}: {m.content}" for m in turns)
    return generation.prompt


def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PromptResponse],
    max_tokens: int,
) -> list[float]:
    """Served scores: the model's raw scalar, normalised with the model's own (shift, scale)."""
    encoded = encode_reward_inputs(
        tokenizer, [p for p, _ in pairs], [r for _, r in pairs], max_tokens
    )
    with torch.inference_mode():
        raw = model(**encoded).logits[:, 0].float()
    shift, scale = reward_normalisation(model)
    return normalise(raw, shift, scale).tolist()


@dataclass
class Arrival:
    """A call announced by `ScoreBatcher.arriving`, counted until it queues or gives up."""

    counted: bool = True


@dataclass
class _Job:
    pairs: list[PromptResponse]
    enqueued: float
    future: Future = field(default_factory=Future)


class ScoreBatcher:
    def __init__(
        self,
        score: BatchScorer,
        max_batch: int = 64,
        max_wait_s: float = 0.002,
        max_queued: int = 1024,
    ) -> None:
        if max_batch < 1 or max_queued < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queued must be >= 1 and max_wait_s >= 0")
        self._score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self._queue: deque[_Job] = deque()
        self._queued = 0
        self._arriving = 0  # calls received (validating) that have not queued their pairs yet
        self._stopping = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)

    @property
    def queued_pairs(self) -> int:
        """Pairs waiting for a forward pass (not counting the one running)."""
        with self._condition:
            return self._queued

    def start(self) -> None:
        self._thread.start()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Held by a call while it is validated: a batch being collected waits for it (and for
        nothing else) until it submits with this `Arrival`, or leaves the block."""
        arrival = Arrival()
        with self._condition:
            self._arriving += 1
        try:
            yield arrival
        finally:
            with self._condition:
                self._arrived(arrival)

    def _arrived(self, arrival: Arrival | None) -> None:
        if arrival is not None and arrival.counted:
            arrival.counted = False
            self._arriving -= 1
            self._condition.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish what is queued, then end the worker."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(
        self,
        pairs: Sequence[PromptResponse],
        timeout: float | None = None,
        arrival: Arrival | None = None,
    ) -> tuple[list[float], int]:
        """Score `pairs` in the next batch; blocks until done. Returns (scores, model version).
        `arrival`: the call's `arriving()` handle, no longer waited for once its pairs queue.

        Raises Overloaded, ShuttingDown, TimeoutError, or whatever scoring raised.
        """
        if not pairs:
            raise ValueError("nothing to score")
        job = _Job(list(pairs), time.monotonic())
        with self._condition:
            self._arrived(arrival)
            if self._stopping:
                raise ShuttingDown("the reward service is shutting down")
            if self._queued + len(job.pairs) > self.max_queued:
                raise Overloaded(f"{self._queued} pairs already queued (limit {self.max_queued})")
            self._queue.append(job)
            self._queued += len(job.pairs)
            QUEUED_PAIRS.set(self._queued)
            self._condition.notify()
        return job.future.result(timeout)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[_Job] | None:
        """The oldest job plus those behind it that fit, within the oldest one's wait bound;
        None once stopping with nothing left to do."""
        with self._condition:
            while not self._queue:
                if self._stopping:
                    return None
                self._condition.wait()
            batch = [self._queue.popleft()]
            size = len(batch[0].pairs)
            deadline = batch[0].enqueued + self.max_wait_s
            while size < self.max_batch:
                if self._queue:
                    if size + len(self._queue[0].pairs) > self.max_batch:
                        break
                    batch.append(self._queue.popleft())
                    size += len(batch[-1].pairs)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping or self._arriving == 0:
                    break  # nobody else is on the way: waiting would only add latency
                self._condition.wait(remaining)
            self._queued -= size
            QUEUED_PAIRS.set(self._queued)
        return batch

    def _execute(self, batch: list[_Job]) -> None:
        pairs = [pair for job in batch for pair in job.pairs]
        BATCH_PAIRS.observe(len(pairs))
        BATCH_REQUESTS.observe(len(batch))
        started = time.perf_counter()
        try:
            scores, version = self._score(pairs)
        except Exception as exc:  # every waiting caller gets the error, the worker lives on
            log.exception("scoring a batch of %d pairs failed", len(pairs))
            for job in batch:
                job.future.set_exception(exc)
            return
        FORWARD_SECONDS.observe(time.perf_counter() - started)
        start = 0
        for job in batch:
            job.future.set_result((scores[start : start + len(job.pairs)], version))
            start += len(job.pairs)

"""Continuous batching for serving: requests join the running batch between decode steps and
leave it as soon as they finish.

One worker thread owns the decode loop. Before every step it admits queued requests (oldest
first) while the batch has room in rows (`max_batch`) and in KV cache (`kv_budget_tokens`), and
prefills them together; then every running request advances one token. A request that finishes
(EOS, stop sequence, length) leaves at once, so a short answer never waits for a long one and a
new request never waits for a whole batch, only for the next step.

Hot swap: a request decodes on the policy version that was served when it was admitted. Running
requests are grouped into cohorts by version; a swap opens a new cohort for newcomers while the
old one drains (a step then runs one forward pass per cohort, briefly). During a canary
(`rlhf.canary`) each request is routed to the incumbent or the candidate as it is admitted, and
both versions' cohorts run side by side for as long as the release stands.

Precision: a version is served as `PolicyWeights`, the checkpoint's float32 weights and the
weights user requests decode with (`models.serving_dtype`: bfloat16 where the hardware multiplies it
natively). Exact requests (a trainer's rollouts, whose logprobs are PPO's behaviour policy)
always decode on the float32 weights, in a cohort of their own. Logprobs are computed in
float32 from either.

Bounds: at most `max_queue` requests wait for admission (more are refused at once, `Overloaded`,
so latency cannot grow without limit), and the KV cache never holds more than `kv_budget_tokens`
columns over all rows: a request reserves its prompt plus `max_new_tokens`, and a cohort holds
(rows x its largest reservation), which bounds its right-aligned cache whatever happens. A
request whose caller gave up (`Job.abandon`) leaves at the next step.

Requests that share a prompt prefix (a chat template's system prompt) prefill only what follows
it once the batcher has seen it twice (`decoding.PrefixCache`, one per served version).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from prometheus_client import Counter, Gauge, Histogram
from transformers import PreTrainedModel

from rlhf import decoding
from rlhf.checkpoints import VerifiedCheckpoint
from rlhf.models import CONFIG_FILE, PackedCast, cast_policy, policy_from_checkpoint
from rlhf.serving import Routes, Served

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "rlhf_generation_batch_size",
    "requests decoded together, per decode step",
    buckets=(1, 2, 4, 8, 12, 16, 32),
)
QUEUE_DEPTH = Gauge("rlhf_generation_queue_depth", "requests waiting to join the running batch")
RUNNING = Gauge("rlhf_generation_running_requests", "requests in the running batch")
KV_RESERVED = Gauge(
    "rlhf_generation_kv_reserved_tokens",
    "KV cache columns reserved by the running batch (bounded by RLHF_GENERATION_KV_BUDGET_TOKENS)",
)
TIME_TO_FIRST_TOKEN = Histogram(
    "rlhf_generation_time_to_first_token_seconds",
    "from enqueue to the first generated token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKENS = Counter("rlhf_generation_tokens_total", "tokens generated (rate() = tokens/s)")


@dataclass(frozen=True, eq=False)
class PolicyWeights:
    """One served policy version: `exact` holds the checkpoint's float32 weights (rollouts'
    behaviour logprobs must be the ones the trainer recomputes), `fast` the weights other
    requests decode with (a bfloat16 copy, or `exact` itself). `buffers`: the checkpoint files'
    bytes that `exact`'s tensors are views of, when it was loaded from the store; `packed`:
    how `fast` is refreshed from `exact` in one copy, when it can be (`rlhf.models.PackedCast`)."""

    exact: PreTrainedModel
    fast: PreTrainedModel
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    packed: PackedCast | None = None

    @classmethod
    def of(
        cls,
        model: PreTrainedModel,
        dtype: torch.dtype,
        buffers: dict[str, torch.Tensor] | None = None,
    ) -> PolicyWeights:
        fast, packed = cast_policy(model, dtype)
        return cls(model, fast, dict(buffers or {}), packed)

    def model(self, exact: bool) -> PreTrainedModel:
        return self.exact if exact else self.fast


class PolicyLoader:
    """Builds each served version's `PolicyWeights` for hot reload, in the memory of a retired
    version when no request decodes on it any more.

    A retired version's file buffers are offered to the store (`reuse`) to read the next
    checkpoint into: its float32 model, whose tensors are views of those buffers, then holds the
    new weights already, and its bfloat16 tensors are overwritten in place. Nothing is
    allocated (no fresh pages to fault in) and no model is constructed; the price is that two
    versions stay resident. Anything that does not line up (another architecture, a version
    still decoding) is built afresh.
    """

    def __init__(self, dtype: torch.dtype, in_use: Callable[[PolicyWeights], bool]) -> None:
        self._dtype = dtype
        self._in_use = in_use
        self._lock = threading.Lock()
        self._current: PolicyWeights | None = None
        self._retired: PolicyWeights | None = None
        self._offered: PolicyWeights | None = None

    def initial(self, weights: PolicyWeights) -> PolicyWeights:
        """Record the version served at start-up."""
        self._current = weights
        return weights

    def reuse(self) -> dict[str, torch.Tensor] | None:
        """Buffers to read the next checkpoint into: the retired version's, if it is free."""
        with self._lock:
            spare = self._retired
            usable = spare is not None and spare.buffers and not self._in_use(spare)
            self._offered = spare if usable else None
            return dict(self._offered.buffers) if self._offered is not None else None

    def build(self, checkpoint: VerifiedCheckpoint) -> PolicyWeights:
        with self._lock:
            spare, self._offered = self._offered, None
            weights = self._rebuilt(spare, checkpoint) if spare is not None else None
            if weights is None:
                model = policy_from_checkpoint(checkpoint)
                weights = PolicyWeights.of(model, self._dtype, checkpoint.buffers)
            if spare is not None:  # its buffers now hold other bytes: never offer it again
                self._retired = None
            self._retired, self._current = self._current, weights
            return weights

    @staticmethod
    def _rebuilt(spare: PolicyWeights, checkpoint: VerifiedCheckpoint) -> PolicyWeights | None:
        """`spare` with the checkpoint's weights, if they were read into its own buffers at the
        places its float32 tensors view; None otherwise."""
        config = spare.exact.config
        announced = type(config).from_dict(checkpoint.json_files.get(CONFIG_FILE, {}))
        if announced.to_dict() != config.to_dict():
            return None
        loaded = {
            name: tensor for state in checkpoint.tensors.values() for name, tensor in state.items()
        }
        exact = spare.exact.state_dict()
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(loaded) != set(exact) - tied:
            return None
        for name, source in loaded.items():
            tensor = exact[name]
            if (source.data_ptr(), source.shape, source.dtype) != (
                tensor.data_ptr(),
                tensor.shape,
                tensor.dtype,
            ):
                return None
        if spare.packed is not None:  # the bfloat16 weights mirror the buffer: one copy
            spare.packed.refresh()
        elif spare.fast is not spare.exact:
            fast = spare.fast.state_dict()
            done: set[int] = set()  # tied weights (lm_head = embeddings) are copied once
            with torch.no_grad():
                for name, tensor in exact.items():
                    if fast[name].data_ptr() not in done:
                        fast[name].copy_(tensor)
                        done.add(fast[name].data_ptr())
        return PolicyWeights(spare.exact, spare.fast, dict(checkpoint.buffers), spare.packed)


class Overloaded(Exception):
    """The queue is full: the caller should answer RESOURCE_EXHAUSTED."""


class ShuttingDown(Exception):
    """The batcher is stopping and takes no new work."""


@dataclass(eq=False)
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
    abandoned: bool = False
    exact: bool = False  # decode on the float32 weights (a trainer's rollout)
    # who asks (tenant and user key), for a canary's sticky routing; None: routed on its own
    route_key: str | None = None

    @property
    def reservation(self) -> int:
        """KV cache columns this request may come to occupy."""
        return len(self.prompt_ids) + self.sampling.max_new_tokens

    def abandon(self) -> None:
        """The caller no longer waits (timeout, cancelled): stop spending steps on it."""
        self.abandoned = True


@dataclass(frozen=True)
class JobResult:
    completion: decoding.Completion
    policy_version: int
    batch_size: int  # requests in the batch when this one finished


@dataclass(eq=False)
class _Cohort:
    """The running requests of one policy version (and precision)."""

    served: Served
    exact: bool
    batch: decoding.DecodeBatch

    def reserved(self, extra: int = 0, reservation: int = 0) -> int:
        """KV columns this cohort holds, or would hold with `extra` more rows of `reservation`."""
        rows = self.batch.rows
        largest = max([reservation] + [row.reservation for row in rows])
        return (len(rows) + extra) * largest


class ContinuousBatcher:
    def __init__(
        self,
        policy: Routes,
        eos_ids: set[int],
        pad_id: int,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 64,
        kv_budget_tokens: int = 32768,
    ) -> None:
        self._policy = policy
        self._eos_ids = eos_ids
        self._pad_id = pad_id
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.kv_budget_tokens = kv_budget_tokens
        self._queue: deque[Job] = deque()
        self._cohorts: list[_Cohort] = []
        # learnt prompt prefixes per served version (id -> the version, per precision)
        self._prefixes: dict[int, tuple[Served, dict[bool, decoding.PrefixCache]]] = {}
        self._condition = threading.Condition()
        self._arriving = 0  # requests being validated and tokenised, about to be submitted
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Refuse new work, finish what is queued and running, then return."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def serving(self, weights: object) -> bool:
        """Whether a running request decodes on `weights` (a served version's model)."""
        with self._condition:
            return any(cohort.served.model is weights for cohort in self._cohorts)

    def running(self) -> int:
        """Requests in the running batch (every cohort)."""
        return sum(len(cohort.batch) for cohort in list(self._cohorts))

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (validating, tokenising): an idle batcher collecting a
        burst waits for it, so the burst shares one prefill."""
        with self._condition:
            self._arriving += 1
        try:
            yield
        finally:
            with self._condition:
                self._arriving -= 1
                self._condition.notify_all()

    def submit(self, job: Job) -> Future:
        if job.reservation > self.kv_budget_tokens:
            raise ValueError(
                f"prompt plus max_new_tokens is {job.reservation} tokens; the KV budget is "
                f"{self.kv_budget_tokens}"
            )
        with self._condition:
            if self._stopping:
                raise ShuttingDown("the generation service is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"{self.max_queue} requests already queued")
            self._queue.append(job)
            QUEUE_DEPTH.set(len(self._queue))
            self._condition.notify_all()
        return job.future

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._condition:
                if not self._cohorts:
                    if not self._queue:
                        if self._stopping:
                            return
                        self._condition.wait(0.1)
                        continue
                    self._collect_burst()
            self._admit()
            for cohort in list(self._cohorts):
                self._step(cohort)

    def _collect_burst(self) -> None:
        """Idle, with a request queued: wait while companions keep arriving less than
        `max_wait_s` apart (or are still being tokenised), up to `max_batch` requests or ten
        gaps in all, so a burst is prefilled together. Caller holds the condition."""
        deadline = time.perf_counter() + 10 * self.max_wait_s
        seen = len(self._queue)
        while seen < self.max_batch and not self._stopping:
            wait = min(self.max_wait_s, deadline - time.perf_counter())
            if wait <= 0:
                return
            self._condition.wait(wait)
            if len(self._queue) > seen:
                seen = len(self._queue)
            elif not (self._arriving > 0 and time.perf_counter() < deadline):
                return

    def _admit(self) -> None:
        """Move queued requests (oldest first) into running cohorts while they fit; each joins
        the cohort of the version it is routed to (`Routes.served_for`: the served version, or
        during a canary the incumbent or the candidate) and of its precision. Versions are read
        and cohorts registered under the condition, so `serving` never misses one."""
        joining: dict[_Cohort, list[Job]] = {}
        with self._condition:
            if not self._queue:
                return
            rows = sum(len(c.batch) for c in self._cohorts)
            while self._queue and rows < self.max_batch:
                job = self._queue[0]
                if job.abandoned:
                    self._queue.popleft()
                    continue
                served = self._policy.served_for(job.route_key, job.exact)
                cohort = next(
                    (
                        c
                        for c in (*joining, *self._cohorts)
                        if c.served is served and c.exact == job.exact
                    ),
                    None,
                ) or self._cohort(served, job.exact)
                joining.setdefault(cohort, []).append(job)
                if self._reserved(joining) > self.kv_budget_tokens:
                    joining[cohort].pop()
                    if not joining[cohort]:
                        del joining[cohort]
                    break  # oldest first: the head waits for room rather than being overtaken
                self._queue.popleft()
                rows += 1
            QUEUE_DEPTH.set(len(self._queue))
            for cohort in joining:
                if cohort not in self._cohorts:
                    self._cohorts.append(cohort)
        for cohort, jobs in joining.items():
            self._join(cohort, jobs)

    def _cohort(self, served: Served, exact: bool) -> _Cohort:
        """A new cohort for a served version; it shares the version's learnt prompt prefix
        (see `decoding.PrefixCache`) with the version's earlier cohorts. The prefixes of the
        two versions used last are kept (a canary's incumbent and candidate)."""
        key = id(served)
        kept = self._prefixes.pop(key, None)
        if kept is None or kept[0] is not served:
            kept = (served, {})
        self._prefixes[key] = kept  # the most recently used last
        while len(self._prefixes) > 2:
            del self._prefixes[next(iter(self._prefixes))]
        prefixes = kept[1].setdefault(exact, decoding.PrefixCache())
        model = served.model.model(exact)
        batch = decoding.DecodeBatch(model, self._eos_ids, self._pad_id, prefixes)
        return _Cohort(served, exact, batch)

    def _reserved(self, joining: dict[_Cohort, list[Job]]) -> int:
        """KV columns held by every cohort once `joining` has joined."""
        total = 0
        for cohort in set(self._cohorts) | set(joining):
            jobs = joining.get(cohort, [])
            largest = max([0] + [job.reservation for job in jobs])
            total += cohort.reserved(len(jobs), largest)
        return total

    def _join(self, cohort: _Cohort, admitted: list[Job]) -> None:
        rows = [
            decoding.Row(job.prompt_ids, job.sampling, job.stop_check, self._on_token(job), job)
            for job in admitted
        ]
        try:
            finished = cohort.batch.join(rows)
        except Exception as exc:  # a failed prefill fails its requests, not the running ones
            log.exception("prefilling %d requests failed", len(rows))
            for job in admitted:
                job.future.set_exception(exc)
            finished = []
        self._finish(cohort, finished)

    def _step(self, cohort: _Cohort) -> None:
        abandoned = [row for row in cohort.batch.rows if row.tag.abandoned]
        if abandoned:
            cohort.batch.drop(abandoned)
        if cohort.batch:
            BATCH_SIZE.observe(len(cohort.batch))
            try:
                finished = cohort.batch.step()
            except Exception as exc:  # a failed step fails its requests, not the service
                log.exception("a decode step of %d requests failed", len(cohort.batch))
                for row in cohort.batch.rows:
                    row.tag.future.set_exception(exc)
                cohort.batch.drop(list(cohort.batch.rows))
                finished = []
            self._finish(cohort, finished)
        else:
            self._finish(cohort, [])

    def _finish(self, cohort: _Cohort, finished: list[decoding.Row]) -> None:
        remaining = len(cohort.batch)
        for row in finished:
            job: Job = row.tag
            TOKENS.inc(len(row.completion.token_ids))
            job.future.set_result(
                JobResult(row.completion, cohort.served.version, remaining + len(finished))
            )
        if not cohort.batch and cohort in self._cohorts:
            with self._condition:
                self._cohorts.remove(cohort)
        RUNNING.set(sum(len(c.batch) for c in self._cohorts))
        KV_RESERVED.set(sum(c.reserved() for c in self._cohorts))

    @staticmethod
    def _on_token(job: Job) -> Callable[[int, float], None]:
        def on_token(token: int, logprob: float) -> None:
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
                TIME_TO_FIRST_TOKEN.observe(job.first_token_at - job.enqueued_at)
            if job.on_token is not None:
                try:
                    job.on_token(token, logprob)
                except Exception:  # a vanished stream reader must not fail its batch-mates
                    log.exception("token callback failed; the request keeps decoding")

        return on_token

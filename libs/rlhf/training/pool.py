"""PPO rollouts on the generation service pool, with a bound on how stale they may be.

In-process rollouts hold the trainer's CPU (or GPU) for the whole decode; sampling on the
generation pool frees it for the update and lets rollouts scale with the pool. The price is that
the pool serves the trainer's latest *published* policy, and only once it has hot-reloaded it,
so a rollout can come from an older version than the one being trained. Two things keep that
honest:

- **Staleness bound.** With V the trainer's latest published version and L `max_policy_lag`, a
  sample from a version older than V - L is discarded and asked for again (the pool may still be
  loading the new weights), until a bounded wait runs out; then `StaleRollouts`, which the
  training loop handles like a reward outage (the batch goes back, to be retried later). If a
  sample arrives from a version newer than V (another replica already serving something the
  trainer has not seen yet), the bound is measured from that version instead, so a batch never
  spans more than L versions.
- **Importance sampling.** Each sample keeps the per-token logprobs the pool sampled with (the
  behaviour policy) and its version; the PPO update weights each token by the truncated ratio of
  the trainer's recomputed logprobs to those (`rlhf.algorithms.ppo.truncated_importance_weights`).

The sampler is the same shape as in-process sampling: prompts and one `decoding.Sampling` per
prompt in (the learner picks temperature and seeds), completions out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Histogram

from rlhf import decoding
from rlhf.clients import PoolCompletion, RolloutsUnavailable

log = logging.getLogger(__name__)

POOL_SAMPLES = Counter(
    "rlhf_trainer_pool_samples_total", "PPO rollouts received from the generation pool"
)
STALE_SAMPLES = Counter(
    "rlhf_trainer_pool_stale_samples_total",
    "pool rollouts discarded for coming from a policy older than RLHF_PPO_MAX_POLICY_LAG allows",
)
POLICY_LAG = Histogram(
    "rlhf_trainer_policy_lag",
    "policy versions between the trainer's latest published policy and each rollout it trains on",
    buckets=(0, 1, 2, 3, 4, 6, 8, 16),
)

# A pool serving a batch this large at once would only queue it: larger batches go in waves.
MAX_IN_FLIGHT = 16


class StaleRollouts(RolloutsUnavailable):
    """The pool kept serving policy versions older than the staleness bound allows for longer
    than the sampler may wait (e.g. it cannot load the newest checkpoint)."""


class RolloutClient(Protocol):
    """What the sampler needs from the pool (`rlhf.clients.GenerationClient`)."""

    def rollouts(
        self, prompts: Sequence[Sequence[int]], params: Sequence[decoding.Sampling]
    ) -> list[PoolCompletion]: ...


@dataclass(frozen=True)
class PoolRollouts:
    """A batch sampled on the pool: per prompt, a completion (token ids, behaviour logprobs,
    finish reason) and the policy version that sampled it; `latest_version` is V, the trainer's
    latest published version when the batch was asked for."""

    completions: list[decoding.Completion]
    policy_versions: list[int]
    latest_version: int

    @property
    def max_lag(self) -> int:
        """Versions the oldest sample is behind V (0 if none is: a replica may be ahead)."""
        return max(0, *(self.latest_version - v for v in self.policy_versions))


class PoolSampler:
    """Samples PPO rollouts on the generation pool within `max_policy_lag` versions of the
    trainer's latest published policy (`latest_version()`, e.g. the store's newest policy).

    Rows that came back too stale are asked for again (same seed: on the newer version it is a
    fresh, reproducible draw) every `retry_interval` seconds, until `max_wait` seconds after the
    batch started; then `StaleRollouts`. `sleep` and `clock` are for tests.
    """

    def __init__(
        self,
        client: RolloutClient,
        latest_version: Callable[[], int],
        max_policy_lag: int = 1,
        max_wait: float = 60.0,
        retry_interval: float = 0.5,
        max_in_flight: int = MAX_IN_FLIGHT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_policy_lag < 0 or max_wait < 0 or retry_interval <= 0 or max_in_flight < 1:
            raise ValueError(
                "max_policy_lag and max_wait must be >= 0, retry_interval > 0, max_in_flight >= 1"
            )
        self._client = client
        self._latest_version = latest_version
        self.max_policy_lag = max_policy_lag
        self._max_wait = max_wait
        self._retry_interval = retry_interval
        self._max_in_flight = max_in_flight
        self._clock = clock
        self._sleep = sleep

    def sample(
        self, prompts: Sequence[Sequence[int]], params: Sequence[decoding.Sampling]
    ) -> PoolRollouts:
        """One completion per prompt, every one from a version within the bound; raises
        `StaleRollouts` after the bounded wait, or what the client raises."""
        if len(prompts) != len(params) or not prompts:
            raise ValueError("need one Sampling per prompt, and at least one prompt")
        latest = self._latest_version()
        newest = latest  # the version the bound is measured from (see the module docstring)
        deadline = self._clock() + self._max_wait
        accepted: dict[int, PoolCompletion] = {}
        pending = list(range(len(prompts)))
        while True:
            for row, completion in zip(pending, self._ask(prompts, params, pending), strict=True):
                accepted[row] = completion
            POOL_SAMPLES.inc(len(pending))
            newest = max(newest, *(c.policy_version for c in accepted.values()))
            floor = newest - self.max_policy_lag
            pending = sorted(r for r, c in accepted.items() if c.policy_version < floor)
            for row in pending:
                del accepted[row]
            STALE_SAMPLES.inc(len(pending))
            if not pending:
                break
            if self._clock() >= deadline:
                raise StaleRollouts(
                    f"the generation pool still serves a policy older than v{floor} "
                    f"(newest v{newest}, max lag {self.max_policy_lag}) after "
                    f"{self._max_wait:.0f} s; {len(pending)} of {len(prompts)} rollouts were stale"
                )
            log.info(
                "%d of %d pool rollouts older than v%d; asking again (the pool may be reloading)",
                len(pending),
                len(prompts),
                floor,
            )
            self._sleep(self._retry_interval)
        rows = [accepted[row] for row in range(len(prompts))]
        for completion in rows:
            POLICY_LAG.observe(max(latest - completion.policy_version, 0))
        return PoolRollouts(
            completions=[
                decoding.Completion(c.token_ids, c.logprobs, c.finish_reason) for c in rows
            ],
            policy_versions=[c.policy_version for c in rows],
            latest_version=latest,
        )

    def _ask(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[decoding.Sampling],
        rows: Sequence[int],
    ) -> list[PoolCompletion]:
        """The rows' completions, at most `max_in_flight` requests at a time."""
        out: list[PoolCompletion] = []
        for start in range(0, len(rows), self._max_in_flight):
            wave = rows[start : start + self._max_in_flight]
            out.extend(self._client.rollouts([prompts[r] for r in wave], [params[r] for r in wave]))
        return out

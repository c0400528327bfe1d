"""Live reward: score a sample of served generations and export the distribution (drift signal).

The reward service reads the generation topic in its own consumer group (replicas share the
partitions, so each event is scored once across them), keeps a deterministic fraction of the
events, scores them with the served reward model and records the scores in a histogram labelled
by the policy version that produced the answer and the reward version that scored it. Prometheus
then compares the live reward mean with its trailing baseline (deploy/prometheus/rules.yml).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence

from prometheus_client import Counter, Histogram, Summary

from rlhf.bus import EventConsumer
from rlhf.scoring import PromptResponse, reward_prompt
from rlhf.v1 import events_pb2

log = logging.getLogger(__name__)

# Served rewards are normalised (mean 0, std 1 on reference-policy answers): buckets in stds.
LIVE_REWARD = Histogram(
    "rlhf_reward_live_score",
    "served reward of sampled live generations, by producing policy and scoring reward model",
    ["policy_version", "reward_version"],
    buckets=(-3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3),
)
# Histograms with negative buckets do not export _sum (OpenMetrics), so the mean comes from a
# Summary over the same observations: rate(_sum) / rate(_count).
LIVE_REWARD_MOMENTS = Summary(
    "rlhf_reward_live",
    "sum and count of the sampled live rewards, for their mean",
    ["policy_version", "reward_version"],
)
LIVE_EVENTS = Counter(
    "rlhf_reward_live_events_total",
    "generation events read by the drift sampler, by what happened to them",
    ["outcome"],  # scored, skipped (not in the sample), failed (scoring raised)
)

Score = Callable[[Sequence[PromptResponse]], tuple[list[float], int]]


def in_sample(generation_id: str, fraction: float) -> bool:
    """Whether a generation is in the drift sample: a hash of its id, so the choice does not
    depend on which replica reads it or how often it is redelivered."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(generation_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def record_live_rewards(
    events: Sequence[events_pb2.GenerationEvent], fraction: float, score: Score, chunk: int = 32
) -> int:
    """Score the sampled `events` and observe them in LIVE_REWARD; returns how many were scored."""
    sampled = [e for e in events if in_sample(e.generation_id, fraction)]
    LIVE_EVENTS.labels("skipped").inc(len(events) - len(sampled))
    scored = 0
    for start in range(0, len(sampled), chunk):
        part = sampled[start : start + chunk]
        try:
            scores, reward_version = score([(reward_prompt(e), e.response) for e in part])
        except Exception as exc:  # drift is best effort: never let it take the service down
            LIVE_EVENTS.labels("failed").inc(len(part))
            log.warning("scoring %d live generations failed: %s", len(part), exc)
            continue
        for event, value in zip(part, scores, strict=True):
            labels = (str(event.policy_version), str(reward_version))
            LIVE_REWARD.labels(*labels).observe(value)
            LIVE_REWARD_MOMENTS.labels(*labels).observe(value)
        LIVE_EVENTS.labels("scored").inc(len(part))
        scored += len(part)
    return scored


class LiveRewardSampler:
    """A background thread: poll generation events, record live rewards, commit offsets."""

    def __init__(self, consumer: EventConsumer, fraction: float, score: Score) -> None:
        self._consumer = consumer
        self._fraction = fraction
        self._score = score
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reward-drift", daemon=True)
        self.scored = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=15)
        self._consumer.close()

    def ready(self) -> bool:
        """True once the consumer group gave this replica its partitions."""
        return bool(self._consumer.assignment())

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                records = self._consumer.poll(timeout=0.5)
                events = [r.message for r in records]
                if events:
                    self.scored += record_live_rewards(events, self._fraction, self._score)
                    # Metrics live in memory, so there is nothing more durable to wait for.
                    self._consumer.commit()
            except Exception:  # the broker may come and go; keep serving Score meanwhile
                log.exception("drift sampling failed; retrying")
                self._stopping.wait(1.0)

"""One snapshot of the running loop, from the services' own answers: the served policy
(generation, gRPC), the trainers' status (gRPC; the release stage's canary and gate when it
runs), thumbs per policy version and the feedback rate
(the feedback service's /metrics), live reward per policy version (the reward service's drift
sample), and the thumbs-up rate by wall-clock window with its confidence interval (a `Trend` of
the feedback counters between snapshots). The `make up` view and the playground both show it.
Any source that does not answer is left out and named, so a service that restarts never stops a
view.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from rlhf.auth import ClientSecurity, dial
from rlhf.scrape import samples, scrape_url, sum_by
from rlhf.v1 import generation_pb2, generation_pb2_grpc, trainer_pb2, trainer_pb2_grpc

RATE_WINDOW = 60.0  # seconds the feedback rate is averaged over
TREND_WINDOW = 120.0  # seconds of thumbs per trend point
TREND_POINTS = 8  # newest windows kept
# z of a two-sided 90% interval: a rate is shown with the range it lies in 9 times out of 10.
Z90 = 1.6449
# A trainer busy with a PPO update on 2 cores can take seconds to answer GetStatus.
CALL_TIMEOUT = 5.0


@dataclass
class VersionRow:
    """What users and the reward model said about one policy version's answers."""

    version: int
    thumbs: int = 0
    up: int = 0
    scored: int = 0
    reward_sum: float = 0.0

    @property
    def up_rate(self) -> float | None:
        return self.up / self.thumbs if self.thumbs else None

    @property
    def live_reward(self) -> float | None:
        return self.reward_sum / self.scored if self.scored else None


def wilson(up: int, total: int, z: float = Z90) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927): unlike rate +- z * se it stays in
    [0, 1] and is honest on a handful of ratings (3 of 3 up is 0.52 to 1 at 90%, not 1 to 1)."""
    if total <= 0:
        return 0.0, 1.0
    rate = up / total
    denominator = 1 + z * z / total
    centre = (rate + z * z / (2 * total)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Window:
    """The thumbs given in one wall-clock window and the thumbs-up rate's 90% interval."""

    start: float  # seconds since the trend began
    end: float
    up: int
    total: int

    @property
    def rate(self) -> float | None:
        return self.up / self.total if self.total else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.up, self.total)


class Trend:
    """The thumbs-up rate by wall-clock window, from cumulative counters read now and then:
    each window counts the thumbs that arrived in it, whichever policy version they rated (a
    window spans the versions served in it), so the trend shows whether users are getting
    happier over time."""

    def __init__(self, window: float = TREND_WINDOW, points: int = TREND_POINTS) -> None:
        self.window = window
        self.points = points
        self._began: float | None = None
        self._first: tuple[int, int] | None = None  # (up, total) at the first reading
        self._closed: deque[Window] = deque(maxlen=points)
        self._open_start = 0.0
        self._at_open: tuple[int, int] = (0, 0)
        self._last: tuple[int, int] = (0, 0)

    def add(self, now: float, up: int, total: int) -> None:
        """A reading of the cumulative counters at `now` (monotonic seconds)."""
        if self._began is None:
            self._began, self._at_open, self._last = now, (up, total), (up, total)
            return
        elapsed = now - self._began
        while elapsed >= self._open_start + self.window:  # close the windows that ended
            up0, total0 = self._at_open
            end = self._open_start + self.window
            self._closed.append(Window(self._open_start, end, up - up0, total - total0))
            self._open_start, self._at_open = end, (up, total)
        self._last = (up, total)

    def windows(self, now: float) -> list[Window]:
        """The closed windows, then the one still open (so far)."""
        if self._began is None:
            return []
        (up, total), (up0, total0) = self._last, self._at_open
        current = Window(self._open_start, now - self._began, up - up0, total - total0)
        return [*self._closed, current]


@dataclass
class Snapshot:
    policy: generation_pb2.PolicyInfo | None = None
    ppo: trainer_pb2.TrainerStatus | None = None
    reward: trainer_pb2.TrainerStatus | None = None
    release: trainer_pb2.TrainerStatus | None = None  # when a release stage is watched
    versions: list[VersionRow] = field(default_factory=list)
    feedback_total: int | None = None
    feedback_per_minute: float | None = None
    trend: list[Window] = field(default_factory=list)  # thumbs-up by wall-clock window
    missing: list[str] = field(default_factory=list)  # sources that did not answer


def version_rows(feedback_metrics: str | None, reward_metrics: str | None) -> list[VersionRow]:
    """Per policy version: thumbs from the feedback service, live reward from the reward one."""
    rows: dict[int, VersionRow] = {}

    def row(version: str) -> VersionRow:
        return rows.setdefault(int(version), VersionRow(int(version)))

    if feedback_metrics is not None:
        found = samples(feedback_metrics)
        thumbs = sum_by(found, "rlhf_feedback_thumbs_total", "policy_version", "thumb")
        for (version, thumb), count in thumbs.items():
            row(version).thumbs += int(count)
            row(version).up += int(count) if thumb == "up" else 0
    if reward_metrics is not None:
        found = samples(reward_metrics)
        sums = sum_by(found, "rlhf_reward_live_sum", "policy_version")
        for (version,), count in sum_by(found, "rlhf_reward_live_count", "policy_version").items():
            row(version).scored += int(count)
            row(version).reward_sum += sums.get((version,), 0.0)
    return [rows[version] for version in sorted(rows)]


class Watcher:
    """Takes snapshots of a running platform; keeps its channels open between them.

    `addresses` are gRPC host:port by service name (generation, trainer, reward-trainer,
    release-trainer),
    `metrics_urls` the /metrics URLs (feedback, reward); a service left out is not asked.
    `security`: the key every call and scrape presents (a reader key) and TLS."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        metrics_urls: Mapping[str, str],
        security: ClientSecurity = ClientSecurity(),
    ) -> None:
        self._channels = {name: dial(a, security) for name, a in addresses.items()}
        self._metrics_urls = dict(metrics_urls)
        self._security = security
        self._accepted: deque[tuple[float, float]] = deque()
        self.trend = Trend()

    def _status(self, name: str, missing: list[str]) -> trainer_pb2.TrainerStatus | None:
        if name not in self._channels:
            return None
        try:
            stub = trainer_pb2_grpc.TrainerServiceStub(self._channels[name])
            return stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=CALL_TIMEOUT)
        except grpc.RpcError:
            missing.append(name)
            return None

    def _metrics(self, name: str, missing: list[str]) -> str | None:
        if name not in self._metrics_urls:
            return None
        try:
            return scrape_url(self._metrics_urls[name], CALL_TIMEOUT, self._security)
        except OSError:
            missing.append(f"{name} metrics")
            return None

    def _feedback_rate(self, total: float) -> float | None:
        """Accepted feedback per minute over the last RATE_WINDOW seconds."""
        now = time.monotonic()
        self._accepted.append((now, total))
        while now - self._accepted[0][0] > RATE_WINDOW:
            self._accepted.popleft()
        then, before = self._accepted[0]
        if now - then < 1.0:
            return None
        return max(0.0, total - before) * 60.0 / (now - then)

    def snapshot(self) -> Snapshot:
        shot = Snapshot()
        try:
            if "generation" in self._channels:
                stub = generation_pb2_grpc.GenerationServiceStub(self._channels["generation"])
                request = generation_pb2.GetPolicyInfoRequest()
                shot.policy = stub.GetPolicyInfo(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError:
            shot.missing.append("generation")
        shot.ppo = self._status("trainer", shot.missing)
        shot.reward = self._status("reward-trainer", shot.missing)
        shot.release = self._status("release-trainer", shot.missing)
        feedback = self._metrics("feedback", shot.missing)
        shot.versions = version_rows(feedback, self._metrics("reward", shot.missing))
        if feedback is not None:
            accepted = sum(sum_by(samples(feedback), "rlhf_feedback_accepted_total").values())
            shot.feedback_total = int(accepted)
            shot.feedback_per_minute = self._feedback_rate(accepted)
            up = sum(row.up for row in shot.versions)
            self.trend.add(time.monotonic(), up, sum(row.thumbs for row in shot.versions))
        shot.trend = self.trend.windows(time.monotonic())
        return shot

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

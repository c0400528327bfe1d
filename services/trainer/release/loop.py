"""The release stage: every new policy earns its traffic in a canary, decided by users' thumbs.

The intake (`ReleaseIntake`) reads three topics in the stage's consumer group: policy
checkpoints (new candidates), releases (what generation serves: the stage's own decisions, and
an operator's `rlhf release`), and feedback (thumbs, each carrying the policy version that wrote
the answer, from its verified generation id). It keeps a `Canary`: incumbent, candidate, share,
and the thumbs on each since the canary started.

The work thread (`ReleaseController`), between operator commands:

1. on a first start, pins what generation serves: a release of the store's newest policy (what
   every replica starts on) once the intake has read the topics to their end;
2. when a policy newer than every candidate tried so far, and at least RLHF_RELEASE_MIN_AHEAD
   versions newer than the incumbent, is in, compares
   it with the incumbent offline (the gate, `gate.py`, unless RLHF_RELEASE_GATE=false): one
   that regresses beyond the gate's tolerances is kept in the store but never served (it counts
   as tried, and the status and metrics say why); one that passes gets its canary: a release
   of incumbent + candidate at RLHF_CANARY_SHARE;
3. evaluates the sequential test (`rlhf.algorithms.release.decide`) on the canary's thumbs;
   PROMOTE releases the candidate alone, ROLLBACK or EXPIRED the incumbent alone (a rolled
   back candidate is not tried again; a newer policy is the next candidate);
4. saves its state (the canary and the offsets it covers) after every decision and every
   `STATE_SECONDS`, then commits those offsets: a restarted stage neither loses nor counts a
   thumb twice (a feedback event resent by an app after UNAVAILABLE is, rarely, counted twice:
   the test treats thumbs as independent anyway).

The trainer keeps training on its own line meanwhile (ppo continues from its newest policy,
the candidate's lineage): a candidate that is rolled back leaves the incumbent serving, and
the next checkpoint is compared with the incumbent afresh. With RLHF_PPO_FOLLOW_ROLLBACKS the
ppo stage reads this stage's releases and, after a rollback or an expiry, trains on from the
incumbent instead (`TrainingLoop.follow_rollback`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from prometheus_client import Counter, Gauge

from rlhf import bus
from rlhf.algorithms.release import Decision, ReleaseTest, Thumbs, Verdict, decide
from rlhf.bus import BusUnavailable, EventConsumer
from rlhf.canary import release_event
from rlhf.checkpoints import POLICY, RELEASE_STATE, CheckpointError
from rlhf.clients import RewardUnavailable
from rlhf.training.state import IntakeState
from rlhf.v1 import events_pb2, trainer_pb2

from ..servicer import COLLECTING, COMMAND_TIMEOUT, TRAINING, WAITING, Unsupported
from ..stage import ConsumerThread, Stage, StageParts
from .gate import ReleaseGate

log = logging.getLogger(__name__)

STATE_SECONDS = 30.0  # the canary's thumbs are saved (and offsets committed) this often
AWAIT_SECONDS = 60.0  # longest wait to read back a release the stage published
PIN_OWNER = "release"  # the stage's pins on policies in the store
GATE_RETRY_SECONDS = 15.0  # a gate the reward service could not score is tried again after this

VERDICTS = Counter(
    "rlhf_release_verdicts_total",
    "canaries ended, by decision (promote, rollback, expired) and by whom (test, operator)",
    ["decision", "by"],
)
for _decision in ("promote", "rollback", "expired"):  # series exist at 0, so increase() sees 1
    for _by in ("test", "operator"):
        VERDICTS.labels(_decision, _by)
CANARY_THUMBS = Gauge(
    "rlhf_release_canary_thumbs",
    "thumbs on each version of the running canary since it started",
    ["arm", "thumb"],
)
CANARY_EVIDENCE = Gauge(
    "rlhf_release_canary_difference",
    "candidate minus incumbent thumbs-up rate in the running canary: the estimate and its "
    "always-valid bounds (promote once lower > -margin, roll back once upper < 0)",
    ["bound"],
)
CANARY_VERSION = Gauge(
    "rlhf_release_controller_version", "versions the release stage has released", ["role"]
)

READING = {
    Decision.CONTINUE: "collecting",
    Decision.PROMOTE: "promote",
    Decision.ROLLBACK: "rollback",
    Decision.EXPIRED: "expired",
}


@dataclass(frozen=True)
class Canary:
    """What generation serves (the release in force) and what the stage has seen of policies."""

    incumbent: int = 0
    candidate: int = 0  # 0: no canary
    share: float = 0.0
    started_at: float = 0.0  # wall-clock seconds: the release's decision time
    known: bool = False  # a release was seen or made (else generation serves its start-up pick)
    newest: int = 0  # newest policy announced
    tried: int = 0  # highest version that had a canary (or was refused one by the gate)
    last_decision: str = ""
    gate: dict[str, Any] | None = None  # the last gate's outcome (`ReleaseGate.run`)

    def adopt(self, incumbent: int, candidate: int, share: float, at: float) -> Canary:
        """A release now in force; a new pair of versions starts a new count at `at`."""
        same = (incumbent, candidate) == (self.incumbent, self.candidate) and self.known
        return replace(
            self,
            incumbent=incumbent,
            candidate=candidate,
            share=share if candidate else 0.0,
            started_at=self.started_at if same else at,
            known=True,
            tried=max(self.tried, candidate),
        )

    def counts(self, version: int) -> bool:
        """Whether thumbs on `version` may count, now or in a canary to come: the incumbent's,
        the candidate's, and those of versions newer than both (a candidate whose release is
        not read yet)."""
        return version in (self.incumbent, self.candidate) or version > max(
            self.incumbent, self.candidate
        )


class ThumbLedger:
    """Thumbs per policy version and second received (`FeedbackEvent.received_at`).

    A canary counts the thumbs on its two versions received since it started. Counting by
    when they were received rather than by when they were read makes the count independent of
    the order the intake reads the feedback and the release topics in (a restarted stage
    re-reads both from its saved offsets, in whatever interleaving the broker gives). The second
    a canary starts in counts whole (the incumbent's thumbs of up to a second before it may
    count; a candidate has none before). Earlier seconds are dropped when it starts, so the
    ledger holds at most a canary's duration of seconds per version."""

    def __init__(self, rows: list[list[int]] | None = None) -> None:
        self._seconds: dict[tuple[int, int], list[int]] = {
            (version, second): [up, total] for version, second, up, total in rows or []
        }

    def add(self, version: int, up: bool, at: float) -> None:
        entry = self._seconds.setdefault((version, int(at)), [0, 0])
        entry[0] += up
        entry[1] += 1

    def since(self, version: int, start: float) -> Thumbs:
        first = math.floor(start)
        up = total = 0
        for (v, second), (u, t) in self._seconds.items():
            if v == version and second >= first:
                up, total = up + u, total + t
        return Thumbs(up, total)

    def prune(self, canary: Canary) -> None:
        """Keep only what `canary` or a later one may count."""
        first = math.floor(canary.started_at)
        self._seconds = {
            key: entry
            for key, entry in self._seconds.items()
            if key[1] >= first and canary.counts(key[0])
        }

    def rows(self) -> list[list[int]]:
        return [[v, second, up, total] for (v, second), (up, total) in self._seconds.items()]


def canary_verdict(
    canary: Canary, incumbent: Thumbs, candidate: Thumbs, test: ReleaseTest, now: float
) -> Verdict:
    return decide(incumbent, candidate, max(0.0, now - canary.started_at), test)


class ReleaseIntake(ConsumerThread):
    """Keeps the `Canary` and the `ThumbLedger` up to date from checkpoints, releases and
    thumbs."""

    def __init__(self, consumer: EventConsumer) -> None:
        super().__init__(consumer, "release-intake")
        self.canary = Canary()
        self.ledger = ThumbLedger()
        self.polled = False

    def handle(self, record: bus.Record) -> None:
        message = record.message
        if record.topic == bus.FEEDBACK:
            self.feedback_consumed += 1
            thumb = message.feedback.WhichOneof("signal") == "thumb"
            if thumb and self.canary.counts(message.policy_version):
                at = message.received_at.ToNanoseconds() / 1e9 or time.time()
                up = message.feedback.thumb == events_pb2.THUMB_UP
                self.ledger.add(message.policy_version, up, at)
        elif record.topic == bus.POLICY_CHECKPOINTS:
            self.canary = replace(self.canary, newest=max(self.canary.newest, message.version))
        elif record.topic == bus.RELEASES:
            at = message.decided_at.ToNanoseconds() / 1e9 or time.time()
            self.canary = self.canary.adopt(
                message.incumbent_version,
                message.candidate_version,
                message.candidate_share,
                at,
            )
            self.ledger.prune(self.canary)

    def thumbs(self) -> tuple[Canary, Thumbs, Thumbs]:
        """The canary and its two versions' thumbs since it started, consistent."""
        with self.lock:
            canary = self.canary
            return (
                canary,
                self.ledger.since(canary.incumbent, canary.started_at),
                self.ledger.since(canary.candidate, canary.started_at),
            )

    def after_poll(self) -> None:
        self.polled = True

    @property
    def caught_up(self) -> bool:
        """Read to the end of its topics at least once (what was released is known)."""
        return self.polled and self.lag == 0

    def save_held(self, state: IntakeState) -> None:
        state.data["canary"] = asdict(self.canary)
        state.data["thumbs"] = self.ledger.rows()

    def restore_held(self, state: IntakeState) -> None:
        self.canary = Canary(**state.data.get("canary", {}))
        self.ledger = ThumbLedger(state.data.get("thumbs", []))


def release_consumer(
    bootstrap: str, group: str, publisher: bus.Publisher, max_poll_interval_ms: int
) -> EventConsumer:
    return EventConsumer(
        bootstrap,
        {
            bus.FEEDBACK: events_pb2.FeedbackEvent,
            bus.POLICY_CHECKPOINTS: events_pb2.CheckpointEvent,
            bus.RELEASES: events_pb2.ReleaseEvent,
        },
        group_id=group,
        dead_letters=publisher,
        client_id="release-trainer",
        max_poll_interval_ms=max_poll_interval_ms,
    )


class ReleaseController(Stage):
    """The release stage's work thread (see the module docstring)."""

    name = "release"
    product_kind = POLICY  # what its control plane lists; it never writes or prunes policies
    state_kind = RELEASE_STATE
    idle_wait = 1.0

    def __init__(
        self,
        parts: StageParts,
        test: ReleaseTest,
        share: float,
        start_version: int,
        gate: ReleaseGate | None = None,
        min_ahead: int = 1,
    ) -> None:
        super().__init__(parts)
        self.intake: ReleaseIntake = parts.intake  # type: ignore[assignment]
        self.test = test
        self.share = share
        self._start_version = start_version  # what generation replicas start on
        self._saved_at = 0.0
        self._saved_consumed = -1  # feedback consumed when the state was last saved
        self._awaiting: tuple[int, int] | None = None  # a release published, not read back yet
        self._published_at = 0.0
        self.gate = gate  # None: every new policy gets a canary
        self._gate_retry_at = 0.0
        self.min_ahead = min_ahead  # versions past the incumbent before a policy is offered
        self._pinned: set[int] | None = None  # the policies pinned in the store, once known

    # Status -----------------------------------------------------------------------------------

    def live_status(self) -> dict[str, Any]:
        canary, incumbent, candidate = self.intake.thumbs()
        status = trainer_pb2.ReleaseStatus(
            incumbent_version=canary.incumbent,
            candidate_version=canary.candidate,
            candidate_share=canary.share,
            incumbent_thumbs_up=incumbent.up,
            incumbent_thumbs=incumbent.total,
            candidate_thumbs_up=candidate.up,
            candidate_thumbs=candidate.total,
            last_decision=canary.last_decision,
        )
        if canary.gate:
            gate = canary.gate
            status.gate.CopyFrom(
                trainer_pb2.ReleaseGate(
                    candidate_version=gate["candidate_version"],
                    incumbent_version=gate["incumbent_version"],
                    passed=gate["passed"],
                    summary=gate["summary"],
                    reward_model_version=gate["reward_model_version"],
                    failed=gate["failed"],
                )
            )
            for key in ("candidate", "incumbent"):
                if key in gate:
                    getattr(status.gate, key).CopyFrom(trainer_pb2.GateMeasures(**gate[key]))
        if canary.candidate:
            now = time.time()
            verdict = canary_verdict(canary, incumbent, candidate, self.test, now)
            status.verdict = READING[verdict.decision]
            status.elapsed_seconds = max(0.0, now - canary.started_at)
            if verdict.evidence is not None:
                status.difference = verdict.evidence.difference
                status.lower = verdict.evidence.lower
                status.upper = verdict.evidence.upper
        return {"release": status, "policy_version": canary.incumbent}

    # Operator override ------------------------------------------------------------------------

    def decide(self, verdict: int, timeout: float = COMMAND_TIMEOUT) -> None:
        decision = (
            Decision.PROMOTE
            if verdict == trainer_pb2.RELEASE_VERDICT_PROMOTE
            else Decision.ROLLBACK
        )

        def command() -> None:
            if not self._settled() or not self.intake.canary.candidate:
                raise Unsupported("no canary is running")
            try:
                self._end(decision, "operator")
            except BusUnavailable as exc:
                raise RuntimeError(f"the broker did not take the release: {exc}") from exc

        self.run_command(command, timeout)

    # The loop ---------------------------------------------------------------------------------

    def work(self) -> bool:
        if not self.intake.caught_up:
            self.set_phase(WAITING, "reading what was released so far")
            return False
        if not self._settled():
            self.set_phase(WAITING, "reading back the release just published")
            return False
        canary, incumbent, candidate = self.intake.thumbs()
        self._pin(canary.incumbent, canary.candidate)
        busy = False
        if not canary.known:
            self._release(self._start_version, 0, "initial: what generation started on")
            busy = True
        elif not canary.candidate:
            if canary.newest > canary.tried and canary.newest >= canary.incumbent + self.min_ahead:
                busy = self._offer(canary)
            elif canary.newest > max(canary.incumbent, canary.tried):
                self.set_phase(
                    COLLECTING,
                    f"serving v{canary.incumbent}; v{canary.newest} waits until it is "
                    f"{self.min_ahead} versions ahead (RLHF_RELEASE_MIN_AHEAD)",
                )
            else:
                self.set_phase(COLLECTING, f"serving v{canary.incumbent}; no newer policy")
        else:
            verdict = canary_verdict(canary, incumbent, candidate, self.test, time.time())
            self._publish_gauges(incumbent, candidate, verdict)
            if verdict.decision is Decision.CONTINUE:
                self.set_phase(
                    TRAINING,
                    f"canary v{canary.candidate} ({candidate.total} thumbs) against "
                    f"v{canary.incumbent} ({incumbent.total} thumbs)",
                )
            else:
                self._end(verdict.decision, "test")
                busy = True
        consumed = self.intake.feedback_consumed
        if consumed != self._saved_consumed and time.monotonic() - self._saved_at >= STATE_SECONDS:
            self._save()
        return busy

    def _offer(self, canary: Canary) -> bool:
        """Start the canary of the newest policy if it passes the gate; whether anything was
        done (False: the reward service could not score, the gate is tried again later)."""
        candidate, incumbent = canary.newest, canary.incumbent
        if self._republished(candidate) == incumbent:
            # The ppo stage rolled back to the incumbent (RLHF_PPO_FOLLOW_ROLLBACKS or an
            # operator) and published its weights again: nothing new to put before users.
            self._give_up(candidate, f"v{candidate} skipped: the weights of v{incumbent} again")
            return True
        if self.gate is None:
            self._start_canary(incumbent, candidate)
            return True
        if time.monotonic() < self._gate_retry_at:
            return False
        self._pin(incumbent, candidate)  # its writer must not prune it while it is measured
        if candidate not in self._store.versions(POLICY):
            self._give_up(candidate, f"v{candidate} is gone before its gate")
            return True
        self.set_phase(TRAINING, f"gate: v{candidate} against v{incumbent} on the gate's prompts")
        try:
            outcome = self.gate.run(incumbent, candidate)
        except RewardUnavailable as exc:
            self._gate_retry_at = time.monotonic() + GATE_RETRY_SECONDS
            self.set_phase(WAITING, f"gate: the reward service cannot score v{candidate} ({exc})")
            return False
        with self.intake.lock:
            now = self.intake.canary
            if (now.incumbent, now.candidate) != (incumbent, 0):  # an operator released meanwhile
                return True
            refused = {} if outcome["passed"] else {"tried": max(now.tried, candidate)}
            last = {} if outcome["passed"] else {"last_decision": outcome["summary"]}
            self.intake.canary = replace(now, gate=outcome, **refused, **last)
        if outcome["passed"]:
            self._start_canary(incumbent, candidate)
        else:
            self._save()
        return True

    def _pin(self, *versions: int) -> None:
        """Keep these policies in the store (`CheckpointStore.pin`): what generation serves, a
        canary's candidate, the candidate being gated. The ppo stage prunes all but its newest
        few policies; unpinned, it deleted a candidate while the gate measured it (make up)."""
        wanted = {v for v in versions if v}  # v0, the base model, is not in the store
        if wanted != self._pinned:
            self._store.pin(POLICY, PIN_OWNER, wanted)
            self._pinned = wanted

    def _start_canary(self, incumbent: int, candidate: int) -> None:
        try:
            self._release(incumbent, candidate, "canary", self.share)
        except CheckpointError as exc:  # pruned by its writer (while the gate measured it)
            self._give_up(candidate, f"v{candidate} is gone before its canary ({exc})")

    def _give_up(self, candidate: int, why: str) -> None:
        """Count `candidate` as tried without a canary, and say why."""
        with self.intake.lock:
            now = self.intake.canary
            self.intake.canary = replace(now, tried=max(now.tried, candidate), last_decision=why)
        log.warning("release: %s", why)
        self._save()

    def _republished(self, version: int) -> int | None:
        """The version whose weights policy `version` republishes (a rollback), if it does."""
        try:
            manifest, _ = self._store.read_manifest(POLICY, version)
        except (CheckpointError, OSError, ValueError):
            return None  # the gate says what is wrong with it
        source = manifest.metadata.get("rolled_back_from")
        return int(source) if source is not None else None

    def _settled(self) -> bool:
        """Whether the last release published has been read back by the intake. The topic is
        the one record of what was released, in order: the stage acts again only once its
        intake has read its last release (and every release before it)."""
        if self._awaiting is None:
            return True
        canary = self.intake.canary
        # `known`: before any release is read, the intake's (0, 0) is no release at all, not the
        # initial release of v0 (which was published again and again until it was read back).
        if not canary.known or (canary.incumbent, canary.candidate) != self._awaiting:
            if time.monotonic() - self._published_at < AWAIT_SECONDS:
                return False
            log.warning("release %s not read back in time; going on", self._awaiting)
        self._awaiting = None
        return True

    def _end(self, decision: Decision, by: str) -> None:
        canary, incumbent, candidate = self.intake.thumbs()
        counts = (
            f"{candidate.up}/{candidate.total} thumbs up against {incumbent.up}/{incumbent.total}"
        )
        if decision is Decision.PROMOTE:
            self._release(canary.candidate, 0, f"promote ({by})")
            summary = f"v{canary.candidate} promoted over v{canary.incumbent} ({by}; {counts})"
        else:
            word = "expired" if decision is Decision.EXPIRED else "rollback"
            self._release(canary.incumbent, 0, f"{word} ({by})")
            summary = (
                f"v{canary.candidate} rolled back, v{canary.incumbent} kept "
                f"({word}, {by}; {counts})"
            )
        VERDICTS.labels(READING[decision], by).inc()
        log.info("release: %s", summary)
        with self.intake.lock:
            self.intake.canary = replace(self.intake.canary, last_decision=summary)
        self._save()

    def _release(self, incumbent: int, candidate: int, reason: str, share: float = 0.0) -> None:
        """Publish a release; the intake adopts it when it reads it back (`_awaiting`)."""
        try:
            event = release_event(self._store, POLICY, incumbent, candidate, share, reason)
            self._publisher.publish(bus.RELEASES, POLICY, event)
        except (BusUnavailable, CheckpointError) as exc:
            log.warning("release %s not published yet: %s", reason, exc)
            raise
        self._awaiting = (incumbent, candidate)
        self._published_at = time.monotonic()
        CANARY_VERSION.labels("incumbent").set(incumbent)
        CANARY_VERSION.labels("candidate").set(candidate)
        log.info("released v%d%s (%s)", incumbent, f" + v{candidate}" if candidate else "", reason)

    @staticmethod
    def _publish_gauges(incumbent: Thumbs, candidate: Thumbs, verdict: Verdict) -> None:
        for arm, thumbs in (("incumbent", incumbent), ("candidate", candidate)):
            CANARY_THUMBS.labels(arm, "up").set(thumbs.up)
            CANARY_THUMBS.labels(arm, "down").set(thumbs.total - thumbs.up)
        if verdict.evidence is not None:
            CANARY_EVIDENCE.labels("estimate").set(verdict.evidence.difference)
            CANARY_EVIDENCE.labels("lower").set(verdict.evidence.lower)
            CANARY_EVIDENCE.labels("upper").set(verdict.evidence.upper)

    def _save(self) -> None:
        """Write the intake (canary and offsets) and commit the offsets it covers."""
        state = self.intake.snapshot()
        self.write_state(state, {"canary": state.data["canary"]})
        self.checkpoint_written(None, state.offsets)
        self._saved_at = time.monotonic()
        self._saved_consumed = self.intake.feedback_consumed

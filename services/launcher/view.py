"""What `make up` shows while it runs: one snapshot of the loop, as a live panel or a log line.

A snapshot asks the services what they know (served policy, trainer status over gRPC) and reads
the rest from their /metrics pages: thumbs per policy version from the feedback service, the live
reward per policy version from the reward service's drift sample, the feedback rate from the
feedback service's counter. Any source that does not answer is left out and named, so a service
that restarts never stops the view.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rlhf.scrape import samples, scrape, sum_by
from rlhf.v1 import generation_pb2, generation_pb2_grpc, trainer_pb2, trainer_pb2_grpc

RATE_WINDOW = 60.0  # seconds the feedback rate is averaged over
VERSIONS_SHOWN = 8  # newest policy versions in the table
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


@dataclass
class Snapshot:
    policy: generation_pb2.PolicyInfo | None = None
    ppo: trainer_pb2.TrainerStatus | None = None
    reward: trainer_pb2.TrainerStatus | None = None
    versions: list[VersionRow] = field(default_factory=list)
    feedback_total: int | None = None
    feedback_per_minute: float | None = None
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
    """Takes snapshots of a running platform; keeps its channels open between them."""

    def __init__(self, grpc_ports: Mapping[str, int], metrics_ports: Mapping[str, int]) -> None:
        self._channels = {
            name: grpc.insecure_channel(f"127.0.0.1:{port}") for name, port in grpc_ports.items()
        }
        self._metrics_ports = dict(metrics_ports)
        self._accepted: deque[tuple[float, float]] = deque()

    def _status(self, name: str, missing: list[str]) -> trainer_pb2.TrainerStatus | None:
        try:
            stub = trainer_pb2_grpc.TrainerServiceStub(self._channels[name])
            return stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=CALL_TIMEOUT)
        except grpc.RpcError:
            missing.append(name)
            return None

    def _metrics(self, name: str, missing: list[str]) -> str | None:
        try:
            return scrape(self._metrics_ports[name], timeout=CALL_TIMEOUT)
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
            stub = generation_pb2_grpc.GenerationServiceStub(self._channels["generation"])
            request = generation_pb2.GetPolicyInfoRequest()
            shot.policy = stub.GetPolicyInfo(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError:
            shot.missing.append("generation")
        shot.ppo = self._status("trainer", shot.missing)
        shot.reward = self._status("reward-trainer", shot.missing)
        feedback = self._metrics("feedback", shot.missing)
        shot.versions = version_rows(feedback, self._metrics("reward", shot.missing))
        if feedback is not None:
            accepted = sum(sum_by(samples(feedback), "rlhf_feedback_accepted_total").values())
            shot.feedback_total = int(accepted)
            shot.feedback_per_minute = self._feedback_rate(accepted)
        return shot

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


# --- rendering ----------------------------------------------------------------------------


def _bar(rate: float, width: int = 10) -> str:
    filled = round(rate * width)
    return "█" * filled + "░" * (width - filled)


def _versions_table(rows: list[VersionRow], served: int | None) -> Table:
    table = Table(expand=False, box=None, padding=(0, 2), header_style="bold")
    for column, justify in (("policy", "left"), ("rated", "right"), ("thumbs-up", "left")):
        table.add_column(column, justify=justify)
    table.add_column("live reward", justify="right")
    for row in rows[-VERSIONS_SHOWN:]:
        rate = row.up_rate
        table.add_row(
            f"v{row.version}" + (" (served)" if row.version == served else ""),
            str(row.thumbs),
            f"{_bar(rate)} {rate:4.0%}" if rate is not None else "-",
            f"{row.live_reward:+.2f}" if row.live_reward is not None else "-",
        )
    return table


def _facts(shot: Snapshot) -> Table:
    rows = []
    if shot.policy is not None:
        rows.append(("served policy", f"v{shot.policy.version}  ({shot.policy.model})"))
    if shot.ppo is not None:
        ppo = shot.ppo
        rows.append(
            (
                "trainer",
                f"step {ppo.step} · published v{ppo.policy_version} · mean reward "
                f"{ppo.mean_reward:+.3f} · KL {ppo.kl:.4f} · {ppo.pending_prompts} pending prompts"
                + (" · paused" if ppo.paused else ""),
            )
        )
    if shot.reward is not None:
        reward = shot.reward
        rows.append(("reward model", f"v{reward.reward_version} ({reward.step} training rounds)"))
    if shot.feedback_total is not None:
        rate = shot.feedback_per_minute
        per_minute = f"{rate:.1f} / min · " if rate is not None else ""
        rows.append(("feedback", f"{per_minute}{shot.feedback_total} stored"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in rows:
        grid.add_row(name, Text(value))  # Text: no markup in values
    return grid


def panel(shot: Snapshot, footer: str, uptime: float) -> Panel:
    """The live view: the loop's state, then thumbs-up and live reward per policy version."""
    parts: list[RenderableType] = [_facts(shot)]
    served = shot.policy.version if shot.policy is not None else None
    if shot.versions:
        parts += [Text(), _versions_table(shot.versions, served)]
    else:
        parts += [Text(), Text("waiting for the first feedback ...", style="dim")]
    if shot.missing:
        parts += [Text(), Text(f"not answering: {', '.join(shot.missing)}", style="yellow")]
    minutes, seconds = divmod(int(uptime), 60)
    return Panel(
        Group(*parts),
        title=f"rlhf · make up · up {minutes}:{seconds:02d}",
        title_align="left",
        subtitle=footer,
        subtitle_align="left",
        border_style="cyan",
    )


def line(shot: Snapshot) -> str:
    """The same snapshot as one log line (plain mode)."""
    parts = []
    if shot.policy is not None:
        parts.append(f"served policy v{shot.policy.version}")
    if shot.ppo is not None:
        ppo = shot.ppo
        parts.append(
            f"trainer step {ppo.step} (published v{ppo.policy_version}, "
            f"reward {ppo.mean_reward:+.3f}, kl {ppo.kl:.3f}, feedback {ppo.feedback_consumed}, "
            f"waiting prompts {ppo.pending_prompts}{', paused' if ppo.paused else ''})"
        )
    if shot.reward is not None:
        parts.append(f"reward model v{shot.reward.reward_version}")
    rated = [row for row in shot.versions if row.up_rate is not None]
    if rated:
        rates = ", ".join(f"v{r.version} {r.up_rate:.0%} of {r.thumbs}" for r in rated[-4:])
        parts.append(f"thumbs-up {rates}")
    if shot.missing:
        parts.append(f"not answering: {', '.join(shot.missing)}")
    return " | ".join(parts)

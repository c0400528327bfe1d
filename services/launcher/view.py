"""What `make up` shows while it runs: one snapshot of the loop (`rlhf.watch`), as a live panel or
a log line."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rlhf.v1 import generation_pb2, trainer_pb2
from rlhf.watch import TREND_WINDOW, Snapshot, VersionRow, Window

VERSIONS_SHOWN = 8  # newest policy versions in the table
TREND_MINUTES = int(TREND_WINDOW // 60)


# --- rendering ----------------------------------------------------------------------------


def _bar(rate: float, width: int = 10) -> str:
    filled = round(rate * width)
    return "█" * filled + "░" * (width - filled)


def _role(version: int, policy: generation_pb2.PolicyInfo | None) -> str:
    """' (served)', ' (canary 10%)' or nothing: what generation does with `version` now."""
    if policy is None:
        return ""
    if version == policy.version:
        return " (served)"
    if policy.candidate_version and version == policy.candidate_version:
        return f" (canary {policy.candidate_share:.0%})"
    return ""


def _versions_table(rows: list[VersionRow], policy: generation_pb2.PolicyInfo | None) -> Table:
    table = Table(expand=False, box=None, padding=(0, 2), header_style="bold")
    for column, justify in (("policy", "left"), ("rated", "right"), ("thumbs-up", "left")):
        table.add_column(column, justify=justify)
    table.add_column("live reward", justify="right")
    for row in rows[-VERSIONS_SHOWN:]:
        rate = row.up_rate
        table.add_row(
            f"v{row.version}{_role(row.version, policy)}",
            str(row.thumbs),
            f"{_bar(rate)} {rate:4.0%}" if rate is not None else "-",
            f"{row.live_reward:+.2f}" if row.live_reward is not None else "-",
        )
    return table


def _stage(status: trainer_pb2.TrainerStatus) -> str:
    """A stage's phase and why, e.g. 'waiting: no PPO until ...'."""
    if not status.phase:
        return "paused" if status.paused else "running"
    return f"{status.phase}: {status.phase_detail}" if status.phase_detail else status.phase


def _facts(shot: Snapshot) -> Table:
    rows = []
    if shot.policy is not None:
        rows.append(("served policy", f"v{shot.policy.version}  ({shot.policy.model})"))
    if shot.ppo is not None:
        ppo = shot.ppo
        rows.append(("ppo stage", _stage(ppo)))
        if ppo.step:
            rows.append(
                (
                    "",
                    f"step {ppo.step} · published v{ppo.policy_version} · mean reward "
                    f"{ppo.mean_reward:+.3f} (reward model v{ppo.reward_version}) · KL "
                    f"{ppo.kl:.4f} · {ppo.pending_prompts} prompts waiting"
                    + (" · paused" if ppo.paused else ""),
                )
            )
    if shot.reward is not None:
        reward = shot.reward
        rows.append(("reward stage", _stage(reward)))
        rows.append(("", f"reward model v{reward.reward_version} · {reward.step} training rounds"))
    if shot.release is not None:
        rows += release_rows(shot.release)
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


def _thumbs(up: int, total: int) -> str:
    return f"{up}/{total} up ({up / total:.0%})" if total else "0 thumbs"


def canary_text(release: trainer_pb2.ReleaseStatus) -> str:
    """The running canary in a line: candidate, share, each version's thumbs, the verdict."""
    if not release.candidate_version:
        return f"none: v{release.incumbent_version} answers everyone"
    return (
        f"v{release.candidate_version} answers {release.candidate_share:.0%} against "
        f"v{release.incumbent_version} · candidate "
        f"{_thumbs(release.candidate_thumbs_up, release.candidate_thumbs)}, incumbent "
        f"{_thumbs(release.incumbent_thumbs_up, release.incumbent_thumbs)} · {release.verdict}"
        + (
            f" (difference {release.difference:+.2f}, [{release.lower:+.2f}, {release.upper:+.2f}])"
            if release.candidate_thumbs and release.incumbent_thumbs
            else ""
        )
    )


def release_rows(status: trainer_pb2.TrainerStatus) -> list[tuple[str, str]]:
    """The release stage's rows of the view: its phase, the canary, the last gate, the last
    decision."""
    release = status.release
    rows = [("release stage", _stage(status)), ("canary", canary_text(release))]
    if release.gate.candidate_version:
        rows.append(("gate", release.gate.summary))
    if release.last_decision and release.last_decision != release.gate.summary:
        rows.append(("last decision", release.last_decision))
    return rows


def recipe(shot: Snapshot) -> list[tuple[str, bool]]:
    """The steps of the recipe and whether each is reached: ratings of the base policy, the first
    reward model, PPO (or GRPO, RLOO) against it, the reward model refreshed on the new policy's
    answers."""
    reward_version = shot.reward.reward_version if shot.reward is not None else 0
    step = shot.ppo.step if shot.ppo is not None else 0
    # The policy optimisation the ppo stage runs (RLHF_PPO_ALGORITHM): PPO, GRPO or RLOO.
    algorithm = (shot.ppo.algorithm if shot.ppo is not None else "") or "ppo"
    rated = sum(row.thumbs for row in shot.versions)
    return [
        (f"users rate the base policy ({rated} ratings)" if rated else "users rate", rated > 0),
        (
            f"reward model v{reward_version}" if reward_version else "first reward model",
            reward_version >= 1,
        ),
        (f"{algorithm.upper()} (step {step})" if step else algorithm.upper(), step > 0),
        ("reward model refreshed on the new policy's answers", reward_version >= 2 and step > 0),
    ]


def _recipe_line(shot: Snapshot) -> Text:
    text = Text()
    for index, (label, done) in enumerate(recipe(shot)):
        if index:
            text.append("  →  ", style="dim")
        text.append(("✓ " if done else "· ") + label, style="green" if done else "dim")
    return text


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _trend_table(windows: list[Window]) -> Table:
    table = Table(
        title="thumbs-up by window (90% interval)",
        title_justify="left",
        title_style="bold",
        box=None,
        padding=(0, 2),
        header_style="bold",
    )
    for column, justify in (("minutes", "left"), ("rated", "right"), ("thumbs-up", "left")):
        table.add_column(column, justify=justify)
    for window in windows:
        rate = window.rate
        low, high = window.interval
        table.add_row(
            f"{_minutes(window.start)}-{_minutes(window.end)}",
            str(window.total),
            f"{_bar(rate)} {rate:4.0%}  ({low:.0%}-{high:.0%})" if rate is not None else "-",
        )
    return table


def panel(shot: Snapshot, footer: str, uptime: float) -> Panel:
    """The live view: the loop's state, then thumbs-up and live reward per policy version."""
    parts: list[RenderableType] = [_recipe_line(shot), Text(), _facts(shot)]
    if shot.versions:
        if shot.trend:
            parts += [Text(), _trend_table(shot.trend)]
        parts += [Text(), _versions_table(shot.versions, shot.policy)]
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
            f"waiting prompts {ppo.pending_prompts}{', paused' if ppo.paused else ''}, "
            f"{ppo.phase or 'running'})"
        )
    if shot.reward is not None:
        reward = shot.reward
        parts.append(f"reward model v{reward.reward_version} ({reward.phase or 'running'})")
    if shot.release is not None:
        parts.append(f"canary {canary_text(shot.release.release)}")
        if shot.release.release.last_decision:
            parts.append(f"last release decision: {shot.release.release.last_decision}")
    if shot.trend and shot.trend[-1].total:
        last = shot.trend[-1]
        low, high = last.interval
        parts.append(
            f"thumbs-up last {TREND_MINUTES} min {last.rate:.0%} of {last.total} "
            f"({low:.0%}-{high:.0%})"
        )
    rated = [row for row in shot.versions if row.up_rate is not None]
    if rated:
        rates = ", ".join(f"v{r.version} {r.up_rate:.0%} of {r.thumbs}" for r in rated[-4:])
        parts.append(f"thumbs-up {rates}")
    if shot.missing:
        parts.append(f"not answering: {', '.join(shot.missing)}")
    return " | ".join(parts)

"""What `make up` shows while it runs: one snapshot of the loop (`rlhf.watch`), as a live panel or
a log line."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rlhf.watch import Snapshot, VersionRow

VERSIONS_SHOWN = 8  # newest policy versions in the table


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

"""The whole online loop, live: do users' thumbs make SmolLM2-135M better, and how fast?

The platform runs as `make up` runs it, from an empty checkpoint store: the embedded broker, every
service as its own process with `make up`'s settings for a 2-core machine, and the simulated users
asking about `TRAIN_TOPICS` and rating the served policy's answers (thumbs, sometimes a ranking).
The reward stage learns from their ratings, round after round on everything so far, the newest
policy's answers included; the ppo stage waits for the first reward model, then trains against the
served one; the generation service hot-reloads each new policy.

Every `EVAL_EVERY_MINUTES`, evaluation users who never feed training ask the served policy about
`HELDOUT_TOPICS` (topics no training user asks about), through the generation service (rollout
requests: unpublished, so nothing of it reaches training), twice per prompt with fixed seeds. They
rate the answers by the same rule (VADER sentiment, thumbs-down for repetition). Reported per
point: the thumbs-up rate with its 90% interval, the mean sentiment, the KL of the served policy to
the base model on those answers (k1, summed over the answer at the sampling temperature), the mean
length and the distinct word bigrams (reward hacking shows as babble: repetition, length), with
the platform's state (served policy and reward model, PPO step).

`RLHF_PPO_ALGORITHM` in the environment is passed to the trainer like any setting (make up's by
default); every algorithm trains on as many sequences per update (PPO one answer per prompt, grpo
and rloo a group per prompt: fewer prompts), so runs with each algorithm can be compared on the
same held-out users.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench.report import RESULTS, machine, table
from rlhf import bus, decoding
from rlhf.auth import ClientSecurity, dial
from rlhf.broker import EmbeddedBroker, free_port
from rlhf.clients import GenerationClient
from rlhf.config import CommonConfig, load_config
from rlhf.models import (
    MINILM,
    SMOLLM2,
    chat_text,
    load_base_policy,
    load_tokenizer,
    serving_dtype,
)
from rlhf.training.release_gate import answer_kls
from rlhf.v1 import events_pb2, trainer_pb2, trainer_pb2_grpc
from rlhf.watch import wilson
from services.launcher.main import CPU_DEMO, Keys, Process, plan, wait_healthy
from services.simulated_users.users import (
    HELDOUT_PROMPTS,
    distinct_bigrams,
    on_topic,
    rate,
    repetitive,
    sentiment,
    topic_words,
)

MINUTES = 30.0
EVAL_EVERY_MINUTES = 5.0
SAMPLES_PER_PROMPT = 2
NEW_TOKENS = 32  # as the simulated users ask
TEMPERATURE = 0.8  # as the simulated users sample
THRESHOLD = 0.3  # the simulated users' thumbs-up threshold (RLHF_SIM_POSITIVE_THRESHOLD)
CALLS_AT_ONCE = 16  # the evaluator's concurrent rollouts: the users' calls need slots too


@dataclass
class Point:
    minutes: float
    policy_version: int
    reward_version: int
    ppo_step: int
    ppo_phase: str
    thumbs_up: float
    low: float
    high: float
    sentiment: float
    kl: float
    words: float
    distinct2: float
    repetitive: float
    example: str
    # Answers naming nothing of the question's topic (rated down); None in runs before the users
    # checked it (2026-12-06), whose thumbs-up counted sentiment and repetition only.
    off_topic: float | None = None


class Evaluator:
    """Held-out users: the served policy's answers to prompts no training user asks."""

    def __init__(self, generation: str, cache_dir: Path, service_key: str) -> None:
        # Rollouts are the platform's own calls: they present a service key.
        self.client = GenerationClient(
            generation, timeout=300, security=ClientSecurity(key=service_key)
        )
        self.tokenizer = load_tokenizer(cache_dir)
        self.reference = load_base_policy(SMOLLM2, cache_dir).eval()
        chats = [
            chat_text(self.tokenizer, [{"role": "user", "content": p}]) for p in HELDOUT_PROMPTS
        ]
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]
        self.prompt_ids = [i for i in ids for _ in range(SAMPLES_PER_PROMPT)]
        self.topics = [topic_words(p) for p in HELDOUT_PROMPTS for _ in range(SAMPLES_PER_PROMPT)]
        # The same seeds at every point: the differences are the policy's, not the dice's.
        self.params = [
            decoding.Sampling(max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, seed=7_000 + i)
            for i in range(len(self.prompt_ids))
        ]

    def measure(self) -> tuple[dict[str, float], str]:
        completions = []
        for start in range(0, len(self.prompt_ids), CALLS_AT_ONCE):  # within RLHF_MAX_CALLS
            end = start + CALLS_AT_ONCE
            completions += self.client.rollouts(self.prompt_ids[start:end], self.params[start:end])
        texts = self.tokenizer.batch_decode(
            [c.token_ids for c in completions], skip_special_tokens=True
        )
        ups = sum(
            rate(t, THRESHOLD, topic) == events_pb2.THUMB_UP
            for t, topic in zip(texts, self.topics, strict=True)
        )
        low, high = wilson(ups, len(texts))
        return {
            "thumbs_up": ups / len(texts),
            "low": low,
            "high": high,
            "sentiment": statistics.fmean(sentiment(t) for t in texts),
            "kl": self._kl(completions),
            "words": statistics.fmean(len(t.split()) for t in texts),
            "distinct2": statistics.fmean(distinct_bigrams(t) for t in texts),
            "repetitive": sum(repetitive(t) for t in texts) / len(texts),
            "off_topic": sum(
                not on_topic(t, topic) for t, topic in zip(texts, self.topics, strict=True)
            )
            / len(texts),
            "policy_version": float(min(c.policy_version for c in completions)),
        }, texts[0]

    def _kl(self, completions: list) -> float:
        """k1 KL of the served policy to the base model on its own answers, per answer."""
        totals = []
        for start in range(0, len(completions), 16):
            chunk = completions[start : start + 16]
            totals += answer_kls(
                self.reference,
                self.tokenizer,
                self.prompt_ids[start : start + 16],
                [c.token_ids for c in chunk],
                [c.logprobs for c in chunk],
                TEMPERATURE,
            )
        return statistics.fmean(totals)

    def close(self) -> None:
        self.client.close()


def _status(channel: grpc.Channel) -> trainer_pb2.TrainerStatus | None:
    try:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        return stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10)
    except grpc.RpcError:
        return None


def run_loop(minutes: float, every: float) -> dict:
    """Start the platform from scratch, evaluate every `every` minutes for `minutes`."""
    root = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    cache_dir = load_config(CommonConfig).cache_dir
    os.environ["RLHF_CHECKPOINT_DIR"] = str(root / "checkpoints")  # a fresh store
    logs = root / "logs"
    logs.mkdir()
    broker = EmbeddedBroker(port=free_port(), log_path=logs / "broker.log", die_with_parent=True)
    broker.start()
    bus.ensure_topics(broker.bootstrap)
    keys, id_key = Keys.new(), secrets.token_hex(32)
    processes: list[Process] = plan(broker.bootstrap, SMOLLM2, MINILM, keys, id_key)
    stop = threading.Event()
    points: list[Point] = []
    events: dict[str, float] = {}
    try:
        for process in processes:
            process.start(logs)
            if process.grpc_port is not None:
                wait_healthy(process, logs, stop)
        started = time.monotonic()
        print(f"platform up; logs in {logs}", flush=True)
        ports = {p.name: p.grpc_port for p in processes if p.grpc_port is not None}
        evaluator = Evaluator(f"127.0.0.1:{ports['generation']}", cache_dir, keys.service)
        channels = {
            name: dial(f"127.0.0.1:{ports[name]}", ClientSecurity(key=keys.reader))
            for name in ("trainer", "reward-trainer")
        }
        next_eval = 0.0
        while True:
            elapsed = (time.monotonic() - started) / 60
            ppo, reward = _status(channels["trainer"]), _status(channels["reward-trainer"])
            if reward is not None and reward.reward_version >= 1:
                events.setdefault("first reward model", elapsed)
            if ppo is not None and ppo.step >= 1:
                events.setdefault("first PPO update", elapsed)
            dead = [p.name for p in processes if not p.alive()]
            if dead:
                raise RuntimeError(f"stopped unexpectedly: {dead} (logs in {logs})")
            if elapsed >= next_eval:
                figures, example = evaluator.measure()
                point = Point(
                    minutes=elapsed,
                    policy_version=int(figures.pop("policy_version")),
                    reward_version=reward.reward_version if reward is not None else -1,
                    ppo_step=ppo.step if ppo is not None else -1,
                    ppo_phase=ppo.phase if ppo is not None else "",
                    example=example,
                    **figures,
                )
                points.append(point)
                print(json.dumps(asdict(point)), flush=True)
                next_eval += every
                if elapsed >= minutes:
                    break
            time.sleep(5.0)
        evaluator.close()
        for channel in channels.values():
            channel.close()
    finally:
        for process in reversed(processes):
            process.stop()
        broker.stop()
    kept = RESULTS / "loop-logs"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(logs, kept)  # for reading the run afterwards (not committed)
    shutil.rmtree(root, ignore_errors=True)
    return {"points": points, "events": events}


def plot(points: list[Point], events: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [p.minutes for p in points]
    fig, left = plt.subplots(figsize=(7.5, 4.2))
    left.fill_between(
        minutes,
        [100 * p.low for p in points],
        [100 * p.high for p in points],
        alpha=0.2,
        color="tab:green",
    )
    left.plot(minutes, [100 * p.thumbs_up for p in points], "o-", color="tab:green")
    left.set_ylim(0, 100)
    left.set_xlabel("minutes since `make up` started (2 CPU cores, everything on them)")
    left.set_ylabel("held-out thumbs-up (%), 90% interval", color="tab:green")
    for name, at in events.items():
        left.axvline(at, color="grey", linestyle=":")
        left.text(at, 2, f" {name}", rotation=90, va="bottom", fontsize=8, color="grey")
    right = left.twinx()
    right.plot(minutes, [p.kl for p in points], "s--", color="tab:red")
    right.set_ylabel("KL to the base model (nats)", color="tab:red")
    left.set_title("The live loop: simulated users' thumbs -> reward model -> PPO -> served")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def run(quick: bool) -> str:
    minutes, every = (8.0, 2.0) if quick else (MINUTES, EVAL_EVERY_MINUTES)
    demo = CPU_DEMO["trainer"]
    algorithm = os.environ.setdefault("RLHF_PPO_ALGORITHM", demo["RLHF_PPO_ALGORITHM"])
    commit = _commit()  # before the run: the code that ran
    stages = ("trainer", "reward-trainer", "simulated-users")
    settings = {
        f"{n}:{k}" if k == "RLHF_NICE" else k: v  # each process has its own priority
        for n in stages
        for k, v in CPU_DEMO[n].items()
        if k.startswith("RLHF_")
    }
    if "RLHF_PPO_BATCH_SIZE" not in os.environ:
        # Every algorithm trains on make up's sequences per update: PPO one answer per prompt,
        # GRPO and RLOO a group of answers to each of fewer prompts.
        group = int(os.environ.get("RLHF_PPO_GROUP_SIZE", "4"))
        sequences = int(demo["RLHF_PPO_BATCH_SIZE"]) * (
            1 if demo["RLHF_PPO_ALGORITHM"] == "ppo" else group
        )
        batch = sequences if algorithm == "ppo" else sequences // group
        os.environ["RLHF_PPO_BATCH_SIZE"] = str(max(1, batch))
    # what the environment changed is part of the run's settings (the trainer reads it too)
    settings.update({k: v for k, v in os.environ.items() if k.startswith("RLHF_PPO_")})
    # The precision the trainer's passes run in (RLHF_PPO_DTYPE; auto resolves per machine).
    dtype = str(serving_dtype(os.environ.get("RLHF_PPO_DTYPE", "auto"))).removeprefix("torch.")
    result = run_loop(minutes, every)
    saved = {
        "algorithm": algorithm,
        "dtype": dtype,
        "commit": commit,
        "minutes": minutes,
        "every": every,
        "points": [asdict(p) for p in result["points"]],
        "events": result["events"],
        "settings": settings,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{_run_name(saved)}.json").write_text(json.dumps(saved, indent=1))
    return report(saved)


def _run_name(saved: dict) -> str:
    """A run's file name: one per algorithm and trainer precision (float32 runs keep the plain
    name they had before the trainer ran in bfloat16)."""
    dtype = saved.get("dtype", "float32")
    return f"loop-{saved['algorithm']}" + ("" if dtype == "float32" else f"-{dtype}")


def report(saved: dict) -> str:
    """The section for one run (as saved in bench/results/loop-<algorithm>.json), its plot,
    and the algorithms side by side."""
    algorithm, minutes, every = saved["algorithm"], saved["minutes"], saved["every"]
    points, events = [Point(**p) for p in saved["points"]], saved["events"]
    png = RESULTS / f"{_run_name(saved)}.png"
    plot(points, events, png)
    rows = [
        [
            f"{p.minutes:.1f}",
            f"v{p.policy_version}",
            f"v{p.reward_version}",
            p.ppo_step,
            f"{100 * p.thumbs_up:.0f}% ({100 * p.low:.0f}-{100 * p.high:.0f})",
            f"{p.sentiment:+.2f}",
            f"{p.kl:.2f}",
            f"{p.words:.1f}",
            f"{p.distinct2:.3f}",
            f"{100 * p.repetitive:.0f}%",
            "-" if p.off_topic is None else f"{100 * p.off_topic:.0f}%",
        ]
        for p in points
    ]
    first, last = points[0], points[-1]
    shown = ", ".join(f"{k}={v}" for k, v in sorted(saved["settings"].items()))
    topic_rule = "" if last.off_topic is None else " or an answer off the question's topic"
    milestones = ", ".join(f"{name} at {at:.1f} min" for name, at in events.items()) or "none"
    return "\n".join(
        [
            f"Machine: {machine()}. Commit {saved['commit']}, algorithm `{algorithm}`, "
            f"trainer in {saved.get('dtype', 'float32')}.",
            "",
            f"The platform as `make up` runs it, from an empty store, for {minutes:.0f} minutes; "
            f"every {every:.0f} minutes {len(HELDOUT_PROMPTS)} held-out prompts (topics no "
            f"training user asks about) x {SAMPLES_PER_PROMPT} answers of up to {NEW_TOKENS} "
            f"tokens at temperature {TEMPERATURE}, rated by the users' rule (VADER >= "
            f"{THRESHOLD}, thumbs-down for repetition{topic_rule}). Milestones: {milestones}. "
            f"Settings (`make up`'s): {shown}.",
            "",
            table(
                [
                    "minutes",
                    "policy",
                    "reward model",
                    "PPO step",
                    "held-out thumbs-up (90%)",
                    "sentiment",
                    "KL (nats)",
                    "words",
                    "distinct bigrams",
                    "repetitive",
                    "off topic",
                ],
                rows,
            ),
            "",
            f"**Held-out thumbs-up {100 * first.thumbs_up:.0f}% -> {100 * last.thumbs_up:.0f}% "
            f"({100 * last.low:.0f}-{100 * last.high:.0f}% at 90%) after {last.minutes:.0f} "
            f"minutes, KL {last.kl:.1f} nats, distinct bigrams {first.distinct2:.3f} -> "
            f"{last.distinct2:.3f}.**",
            "",
            *([saved["note"], ""] if saved.get("note") else []),
            f"A held-out answer at the end: _{last.example.strip()}_",
            "",
            f"![the live loop](bench/results/{png.name})",
            "",
            *compare_algorithms(),
        ]
    )


def compare_algorithms() -> list[str]:
    """Every algorithm's latest run in each trainer precision (bench/results/loop-*.json), side
    by side: the same held-out users, prompts and seeds, each from an empty store."""
    runs = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("loop-*.json"))]
    rows = []
    for saved in runs:
        points, events = saved["points"], saved["events"]
        first, last = points[0], points[-1]
        rows.append(
            [
                f"`{saved.get('algorithm', '?')}`",
                saved.get("dtype", "float32"),
                saved.get("commit", "?"),
                f"{last['minutes']:.0f}",
                _at(events, "first reward model"),
                _at(events, "first PPO update"),
                last["ppo_step"],
                f"{100 * first['thumbs_up']:.0f}%",
                f"{100 * last['thumbs_up']:.0f}% "
                f"({100 * last['low']:.0f}-{100 * last['high']:.0f})",
                f"{last['kl']:.1f}",
                f"{first['distinct2']:.3f} -> {last['distinct2']:.3f}",
                "sentiment" if last.get("off_topic") is None else "sentiment, topic",
            ]
        )
    if len(rows) < 2:
        return []
    algorithms = {saved.get("algorithm") for saved in runs}
    scaled = any(s["settings"].get("RLHF_PPO_GRPO_SCALE_STD") == "true" for s in runs)
    caveat = (
        [
            "",
            "How far apart two runs of this benchmark land by chance: GRPO without std scaling "
            "(RLHF_PPO_GRPO_SCALE_STD off, the default) and RLOO give every answer the same "
            "advantage up to a constant factor, (G - 1) / G, which AdamW's per-parameter "
            "normalisation cancels (gradient clipping aside). Their rows above are, in effect, "
            "two runs of one algorithm: the gap between them is this benchmark's run-to-run "
            "spread (the rollouts' sampling, the users' pace, when each reward model lands), "
            "not a difference between GRPO and RLOO. The 90% intervals are those of the "
            "held-out measurement only; ranking algorithms by this benchmark needs several runs "
            "of each.",
        ]
        if {"grpo", "rloo"} <= algorithms and not scaled
        else []
    )
    return [
        "### The algorithms side by side (each one's latest run of this benchmark)",
        "",
        table(
            [
                "algorithm (RLHF_PPO_ALGORITHM)",
                "trainer precision (RLHF_PPO_DTYPE)",
                "commit",
                "minutes",
                "first reward model (min)",
                "first update (min)",
                "updates",
                "held-out thumbs-up at start",
                "at the end (90%)",
                "KL (nats)",
                "distinct bigrams",
                "users rate",
            ],
            rows,
        ),
        "",
        "Runs whose users rate sentiment alone (before 2026-12-06) are not comparable with those "
        "whose users also rate an answer that misses the question's topic down: the base "
        "policy's held-out thumbs-up is 34% under the first rule and 28% under the second.",
        *caveat,
    ]


def _at(events: dict[str, float], name: str) -> str:
    return f"{events[name]:.1f}" if name in events else "never"

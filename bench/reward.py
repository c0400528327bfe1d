"""Reward benchmarks on MiniLM: Score throughput through gRPC against the model called directly,
dynamic batching under concurrent callers, and what the reward stage learns from simulated users.

The reward service runs as its own process (as in production) on a real broker, with drift
sampling off so only the benchmark's calls use the CPU. The direct baseline runs in this process
on the same weights while the service is idle, through the same scoring function the service
uses (tokenise, forward, normalise), so the difference is gRPC, queueing and batching.
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.report import ROOT, ServiceProcess, median, table, timed
from rlhf import bus
from rlhf.broker import EmbeddedBroker, free_port
from rlhf.config import CommonConfig, load_config
from rlhf.models import MINILM, load_reward_backbone, serving_dtype, set_reward_normalisation
from rlhf.scoring import PromptResponse, score_pairs
from rlhf.training.reward import (
    DataSnapshot,
    Examples,
    FeedbackDataset,
    FeedbackExamples,
    Pair,
    ReferenceSamples,
    RewardTrainer,
)
from rlhf.training.reward_config import RewardTrainingConfig
from rlhf.v1 import events_pb2, reward_pb2, reward_pb2_grpc
from services.simulated_users.synthetic import PROMPTS, answer, feedback_stream
from services.simulated_users.users import sentiment

BATCHES = (1, 8, 32)
MAX_TOKENS = 256  # the service default
DTYPE = serving_dtype("auto")


def score_request(pairs: Sequence[PromptResponse]) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        pairs=[reward_pb2.ScoredPair(prompt=p, response=r) for p, r in pairs]
    )


class Service(ServiceProcess):
    """The reward service as a subprocess on its own ports."""

    def __init__(self, bootstrap: str, store: Path) -> None:
        self.metrics_port = free_port()
        settings = {
            "RLHF_CHECKPOINT_DIR": str(store),
            "RLHF_METRICS_PORT": str(self.metrics_port),
            "RLHF_REWARD_MODEL": MINILM,
            "RLHF_REWARD_DRIFT_SAMPLE": "0",
        }
        super().__init__("services.reward", bootstrap, settings)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    def score(self, pairs: Sequence[PromptResponse]) -> list[float]:
        return list(self.stub.Score(score_request(pairs), timeout=60).scores)

    def metrics(self) -> dict[str, float]:
        """The service's /metrics now: sample name -> value, for the samples the bench reads
        (the Score calls' rlhf_grpc_request_seconds, the batcher's histograms)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("method", "Score") == "Score" and "le" not in sample.labels:
                    values[sample.name] = sample.value
        return values

    def batch_stats(self) -> tuple[float, float]:
        """(forward passes, pairs scored in them) so far, from the service's /metrics."""
        values = self.metrics()
        return values["rlhf_reward_batch_pairs_count"], values["rlhf_reward_batch_pairs_sum"]

    def stop(self) -> None:
        self.channel.close()
        self.process.terminate()
        self.process.wait(60)


def _answers(count: int, seed: int = 0) -> list[PromptResponse]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt = rng.choice(PROMPTS)
        pairs.append((prompt, answer(prompt, rng)))
    return pairs


def _rate(score: Callable[[Sequence[PromptResponse]], object], pairs: list, batch: int) -> float:
    """Pairs per second scoring `pairs` in calls of `batch`, one call after another."""

    def run() -> None:
        for start in range(0, len(pairs), batch):
            score(pairs[start : start + batch])

    return len(pairs) / timed(run)


# What the service reports about the Score calls it served: handler time, and scoring time.
_HANDLER = ("rlhf_grpc_request_seconds_sum", "rlhf_grpc_request_seconds_count")
_SCORING = ("rlhf_reward_forward_seconds_sum", "rlhf_reward_forward_seconds_count")


def _mean_ms(before: dict[str, float], after: dict[str, float], names: tuple[str, str]) -> float:
    total, count = (after[name] - before[name] for name in names)
    return 1000 * total / max(count, 1)


def throughput(service: Service, repeats: int, pairs_per_run: int) -> str:
    """Pairs/s at batch 1, 8, 32: the model called directly vs Score through gRPC; and where
    a call's time goes."""
    model, tokenizer = load_reward_backbone(MINILM)
    model = model.to(DTYPE)  # as the service runs it (RLHF_REWARD_DTYPE=auto)
    pairs = _answers(pairs_per_run)

    def direct(batch: Sequence[PromptResponse]) -> list[float]:
        return score_pairs(model, tokenizer, batch, MAX_TOKENS)

    rows, overhead_at, split, direct_ms = [], {}, [], {}
    for batch in BATCHES:
        # Fewer pairs at batch 1: per-call costs dominate and the runs are long.
        sample = pairs[: max(64, pairs_per_run // 4)] if batch == 1 else pairs
        _rate(direct, sample[:batch], batch)  # warm up both paths
        _rate(service.score, sample[:batch], batch)
        direct_runs, grpc_runs = [], []
        before = service.metrics()
        for _ in range(repeats):  # interleaved, so a noisy neighbour hits both paths alike
            direct_runs.append(_rate(direct, sample, batch))
            grpc_runs.append(_rate(service.score, sample, batch))
        after = service.metrics()
        calls = repeats * -(-len(sample) // batch)
        per_call = {
            "direct": 1000 * sum(len(sample) / rate for rate in direct_runs) / calls,
            "call": 1000 * sum(len(sample) / rate for rate in grpc_runs) / calls,
            "handler": _mean_ms(before, after, _HANDLER),
            "scoring": _mean_ms(before, after, _SCORING),
        }
        direct_ms[batch] = per_call["direct"]
        split.append(
            [
                batch,
                f"{per_call['direct']:.2f}",
                f"{per_call['call']:.2f}",
                f"{per_call['scoring']:.2f}",
                f"{per_call['handler'] - per_call['scoring']:.2f}",
                f"{per_call['call'] - per_call['handler']:.2f}",
            ]
        )
        # Each repeat's gRPC run against the direct run just before it: the two share the
        # machine's state of the moment, which drifts within minutes here.
        paired = [1 - g / d for d, g in zip(direct_runs, grpc_runs, strict=True)]
        overhead_at[batch] = median(paired)
        rows.append(
            [
                batch,
                f"{median(direct_runs):,.0f}",
                f"{median(grpc_runs):,.0f}",
                f"{overhead_at[batch]:+.1%}",
                ", ".join(f"{p:+.1%}" for p in paired),
            ]
        )
    tokens = tokenizer([p for p, _ in pairs], [r for _, r in pairs])["input_ids"]
    mean_tokens = sum(map(len, tokens)) / len(tokens)
    met = "met" if overhead_at[32] < 0.05 else "**NOT met**"
    return (
        f"### Score throughput: gRPC against the model called directly (median of {repeats})\n\n"
        f"One client, calls back to back; {len(pairs)} (prompt, answer) pairs of "
        f"{mean_tokens:.0f} tokens on average (the simulated users' prompts and templated "
        "answers). Direct = `rlhf.scoring.score_pairs` in the benchmark process (tokenise, "
        f"forward, normalise), the same function the service runs, on the same weights in "
        f"{str(DTYPE).removeprefix('torch.')} (the service's RLHF_REWARD_DTYPE=auto on this "
        "machine). Both processes keep freed heap memory for reuse, as every service does "
        f"(RLHF_HEAP_KEEP_MB={load_config(CommonConfig).heap_keep_mb}).\n\n"
        + table(
            [
                "pairs per call",
                "direct pairs/s",
                "gRPC pairs/s",
                "gRPC overhead (median of the repeats)",
                "each repeat's overhead",
            ],
            rows,
        )
        + "\n\nEach repeat runs the pairs directly, then through gRPC; a repeat's overhead is "
        "its gRPC run's time against its direct run's, so both are measured in the same minute "
        "(this machine's speed changes within minutes).\n\n"
        f"Target: gRPC overhead under 5% at 32 pairs per call: {met} "
        f"({overhead_at[32]:+.1%}). The served path adds the gRPC round trip, request "
        "validation and the batcher's hand-off to its worker thread.\n\n"
        + _where_the_time_goes(split, pairs[:32], direct_ms[32])
        + precision(tokenizer, pairs, repeats)
    )


def _where_the_time_goes(
    split: list[list[object]], request: list[PromptResponse], idle: float
) -> str:
    """The per-call split of the runs above, and a bare gRPC server's round trip of the same
    32-pair request: back to back, and after the client idled as long as a direct call takes."""
    back_to_back, after_idle = echo_round_trips(request, idle / 1000)
    return (
        "### Where a Score call's time goes (the runs above, mean ms per call)\n\n"
        + table(
            [
                "pairs per call",
                "direct",
                "gRPC call",
                "of which scoring in the service",
                "the service's own work",
                "gRPC transport",
            ],
            split,
        )
        + "\n\nScoring is the service's rlhf_reward_forward_seconds (tokenise, forward, "
        "normalise: what the direct call does); its own work is the rest of its Score handler "
        "(rlhf_grpc_request_seconds: validation, the batcher's hand-off, metrics); transport is "
        "the rest of the call as the client saw it (both sides' gRPC, reading the request and "
        "checking its key, and waking the threads that carry the call). The same 32-pair "
        "request to a bare gRPC server that answers at once (`bench/echo.py`) takes "
        f"{back_to_back:.2f} ms a call back to back and "
        f"{after_idle:.2f} ms when the client first idles {idle:.0f} ms (a direct call's time, "
        "as the client idles during each call above): the difference is what waking the "
        "threads that carry a call after an idle spell costs on this machine, with nothing of "
        "the platform involved.\n\n"
    )


def echo_round_trips(
    request: list[PromptResponse], idle: float, calls: int = 60
) -> tuple[float, float]:
    """Median ms of a Score round trip to `bench.echo` (its own process): back to back, and
    each after `idle` seconds of the client sleeping."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.echo", str(port)], cwd=ROOT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        message = score_request(request)

        def round_trips(pause: float) -> float:
            times = []
            for _ in range(calls):
                time.sleep(pause)
                times.append(timed(lambda: stub.Score(message, timeout=10)))
            return 1000 * median(times)

        round_trips(0.0)  # warm up
        return round_trips(0.0), round_trips(idle)
    finally:
        channel.close()
        server.terminate()
        server.wait(10)


def precision(tokenizer, pairs: list[PromptResponse], repeats: int) -> str:  # noqa: ANN001
    """Direct scoring at 32 pairs per call in float32 and bfloat16, same weights."""
    exact = load_reward_backbone(MINILM)[0]
    fast = load_reward_backbone(MINILM)[0].to(torch.bfloat16)
    runs: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    models = {"float32": exact, "bfloat16": fast}
    for model in models.values():  # warm-up
        score_pairs(model, tokenizer, pairs[:32], MAX_TOKENS)
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(
                _rate(lambda b, m=model: score_pairs(m, tokenizer, b, MAX_TOKENS), pairs, 32)
            )
    base = median(runs["float32"])
    rows = [
        [name, f"{median(r):,.0f}", f"{median(r) / base:.2f}x", ", ".join(f"{v:,.0f}" for v in r)]
        for name, r in runs.items()
    ]
    return (
        f"### Reward scoring precision (direct, 32 pairs per call, median of {repeats})\n\n"
        + table(["weights", "pairs/s", "vs float32", "runs (pairs/s)"], rows)
        + "\n\nHow far bfloat16 moves the served score of a trained model is in the quality "
        "section below.\n"
    )


def coalescing(service: Service, seconds: float) -> str:
    """One-pair calls from 1 and 8 concurrent clients: dynamic batching at work."""
    pairs = _answers(64, seed=1)
    rows, single = [], None
    for clients in (1, 8):
        done, stop = [0] * clients, threading.Event()

        def client(index: int, done: list = done, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                service.score([pairs[(index * 7 + done[index]) % len(pairs)]])
                done[index] += 1

        passes_before, pairs_before = service.batch_stats()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        rate = sum(done) / (time.perf_counter() - started)
        passes_after, pairs_after = service.batch_stats()
        per_pass = (pairs_after - pairs_before) / max(passes_after - passes_before, 1)
        single = single or rate
        rows.append([clients, f"{rate:,.0f}", f"{rate / single:.2f}x", f"{per_pass:.1f}"])
    return (
        f"### Dynamic batching: one-pair calls from concurrent clients ({seconds:.0f} s each)\n\n"
        + table(["clients", "pairs/s", "vs 1 client", "pairs per forward pass"], rows)
        + "\n\nConcurrent calls queue while a forward pass runs and share the next one "
        "(at most 64 pairs, at most 2 ms of waiting for company).\n"
    )


def _collect(rounds: int, seed: int) -> tuple[DataSnapshot, list[PromptResponse]]:
    examples, dataset = FeedbackExamples(), FeedbackDataset(heldout_fraction=0.25)
    reference = ReferenceSamples(capacity=128, seed=seed)
    for event in feedback_stream(rounds, seed=seed):
        if isinstance(event, events_pb2.GenerationEvent):
            reference.add(event)
            dataset.add(examples.add_generation(event))
        else:
            dataset.add(examples.add_feedback(event))
    snapshot = dataset.snapshot()
    return DataSnapshot(snapshot.train, snapshot.heldout, Examples()), reference.samples()


def _all_pairs(seed: int, rounds: int) -> list[Pair]:
    """Fresh pairs ranked by the users with no indifference margin (every sentiment gap)."""
    examples, pairs = FeedbackExamples(), []
    for event in feedback_stream(rounds, seed=seed, thumbs=False, min_preference=1e-9):
        if isinstance(event, events_pb2.GenerationEvent):
            examples.add_generation(event)
        else:
            pairs += [item.example for item in examples.add_feedback(event)]
    return pairs


def _accuracy_by_gap(trainer: RewardTrainer, pairs: list[Pair]) -> list[list[str]]:
    chosen = trainer.raw_scores(trainer.model, [p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = trainer.raw_scores(
        trainer.model, [p.prompt for p in pairs], [p.rejected for p in pairs]
    )
    gaps = [sentiment(p.chosen) - sentiment(p.rejected) for p in pairs]
    rows = []
    buckets = {"(0, 0.1]": (0.0, 0.1), "(0.1, 0.3]": (0.1, 0.3), "(0.3, 0.6]": (0.3, 0.6)}
    buckets |= {"(0.6, 2]": (0.6, 2.0), "all": (0.0, 2.0)}
    for label, (low, high) in buckets.items():
        picked = [i for i, gap in enumerate(gaps) if low < gap <= high]
        right = sum(1.0 if chosen[i] > rejected[i] else 0.0 for i in picked)
        rows.append([label, len(picked), f"{right / max(len(picked), 1):.3f}"])
    return rows


def quality(seeds: Sequence[int]) -> str:
    """One reward round per seed on MiniLM: held-out metrics, trained vs the untrained head."""
    rows, trainer = [], None
    for seed in seeds:
        data, reference = _collect(rounds=600, seed=seed)
        model, tokenizer = load_reward_backbone(MINILM, seed=0)
        trainer = RewardTrainer(model, tokenizer, RewardTrainingConfig(seed=0), max_tokens=64)
        started = time.perf_counter()
        result = trainer.round(data, reference)
        seconds = time.perf_counter() - started
        new, old = result.candidate, result.incumbent
        rows.append(
            [
                seed,
                f"{int(new['pairs'])} / {int(new['rated'])}",
                f"{new['pairwise_accuracy']:.3f} ({old['pairwise_accuracy']:.3f})",
                f"{new['thumbs_auc']:.3f} ({old['thumbs_auc']:.3f})",
                f"{new['brier']:.3f} ({old['brier']:.3f})",
                f"{new['ece']:.3f} ({old['ece']:.3f})",
                f"{seconds:.1f}",
            ]
        )
    assert trainer is not None
    fresh = _all_pairs(seed=99, rounds=300)
    gap_rows = _accuracy_by_gap(trainer, fresh)
    drift = _bf16_drift(trainer, tokenizer, fresh)
    return (
        "### What the reward stage learns (MiniLM, one round, simulated users)\n\n"
        "600 interactions per seed: two templated answers to one of the users' prompts, a thumb "
        "on each (VADER sentiment >= 0.3), a ranking when the sentiments differ by 0.1 or more. "
        "25% of generations held out by id. One round: 80 steps of 16 examples, top 2 encoder "
        "layers, pooler and head trained, then evaluation, gate and normalisation. Untrained "
        "head in parentheses.\n\n"
        + table(
            [
                "seed",
                "held-out pairs / thumbs",
                "pairwise accuracy",
                "thumbs AUC",
                "Brier",
                "ECE",
                "round s",
            ],
            rows,
        )
        + "\n\nThe last model on fresh pairs ranked with no indifference margin, by sentiment "
        "gap between the two answers (near-ties are hard for users too):\n\n"
        + table(["sentiment gap", "pairs", "pairwise accuracy"], gap_rows)
        + "\n\nTarget: at least 0.85 held-out pairwise accuracy, far above the untrained head.\n\n"
        + drift
    )


def _bf16_drift(trainer: RewardTrainer, tokenizer, pairs: list[Pair]) -> str:  # noqa: ANN001
    """Served scores of the last trained model in float32 and bfloat16, on the same answers."""
    batch = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    model = copy.deepcopy(trainer.model).eval()
    raw = torch.tensor(score_pairs(model, tokenizer, batch, MAX_TOKENS))
    set_reward_normalisation(model, raw.mean().item(), raw.std().item())
    exact = torch.tensor(score_pairs(model, tokenizer, batch, MAX_TOKENS))
    fast = torch.tensor(score_pairs(model.to(torch.bfloat16), tokenizer, batch, MAX_TOKENS))
    difference = (fast - exact).abs()
    agree = (fast[: len(pairs)] > fast[len(pairs) :]) == (exact[: len(pairs)] > exact[len(pairs) :])
    return (
        f"bfloat16 against float32 scoring with that model, {len(batch)} answers on the served "
        f"scale (normalised to std 1): mean |difference| {difference.mean():.4f}, max "
        f"{difference.max():.4f}; the two agree on {agree.float().mean():.1%} of the "
        f"{len(pairs)} pairwise preferences.\n"
    )


def run(quick: bool) -> str:
    repeats = 3 if quick else 7
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as store:
        bus.ensure_topics(broker.bootstrap)
        service = Service(broker.bootstrap, Path(store))
        try:
            parts = [
                throughput(service, repeats, pairs_per_run=128 if quick else 512),
                coalescing(service, seconds=3.0 if quick else 10.0),
            ]
        finally:
            service.stop()
    parts.append(quality(seeds=(0,) if quick else (0, 1, 2)))
    return "\n".join(parts)

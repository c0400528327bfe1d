"""Trainer benchmarks on SmolLM2-135M: PPO iteration throughput against TRL's PPOTrainer.

One iteration is what the online trainer does per batch: sample rollouts from the current policy,
score them, and run the PPO update (old-policy and reference forward passes, then epochs over
minibatches). Scoring is a cheap programmatic function on both sides (well under a millisecond),
so the figures measure PPO, not a reward model.

The baseline is TRL's PPOTrainer (trl.experimental.ppo, the last TRL release that has it) on the
same weights, batch, minibatch, epochs, response length and temperature, without gradient
checkpointing like ours. TRL trains a separate value model (a second copy of the backbone), its
documented setup; ours puts a linear value head on the policy. Each side runs in this process,
one after the other.

Precision: rows are float32 unless marked bf16. Ours in bf16 is `RLHF_PPO_DTYPE=bfloat16` (the
passes under autocast over float32 weights, rollouts decoded on a bfloat16 copy); TRL in bf16 is
its `bf16=True` (accelerate's autocast, which on the CPU covers its forward passes and its
generation). Each row is compared with the TRL row of the same precision (and LoRA or not).

"ours, GRPO" and "ours, RLOO" are the same iteration with the critic-free estimators
(`RLHF_PPO_ALGORITHM`): the same BATCH rollouts of the same length, as GROUP answers to each of
the first BATCH / GROUP prompts, scored alike, with the same minibatch, epochs and KL penalty,
but no value head (no hidden states kept, no value loss) and advantages from each group.

"ours, pool rollouts" is the same iteration with the rollouts sampled on a generation service
process (the trainer's `RLHF_PPO_ROLLOUTS=pool`: exact prompt ids over gRPC, behaviour logprobs
back, importance-weighted update) serving the same weights. Nothing is published during the
run, so the pool serves v0 throughout and no checkpoint write or reload is in the iteration (as
for in-process rollouts). On a machine whose cores the pool shares with the trainer this
measures what moving rollouts out of process costs; the gain needs the pool on other cores or
machines, where its decoding no longer competes with the update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from bench.report import BENCH_KEY, OtherLoad, ServiceProcess, like_a_service, median, table
from rlhf import bus, decoding
from rlhf.auth import ClientSecurity
from rlhf.broker import EmbeddedBroker
from rlhf.clients import GenerationClient
from rlhf.config import CommonConfig, load_config
from rlhf.models import SMOLLM2, load_base_policy, load_tokenizer, prepare_policy
from rlhf.training import online
from rlhf.training import ppo as ppo_training
from rlhf.training.pool import PoolSampler
from rlhf.training.ppo_config import PPOConfig

BATCH = 8
MINIBATCH = 4
NEW_TOKENS = 48
EPOCHS = 2
TEMPERATURE = 0.7
LEARNING_RATE = 1e-5
LORA_RANK = 16
GROUP = 4  # grpo and rloo: answers per prompt (BATCH / GROUP prompts, BATCH rollouts)
# Asking for long answers, so most responses use all NEW_TOKENS and both sides do equal work.
PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a neural network learns.",
    "Describe, step by step, how to bake bread at home.",
    "Write a long letter to a friend about your travels.",
    "Explain the history of the bicycle in detail.",
    "Describe a busy market in a large city at length.",
    "Write a detailed guide to planting a vegetable garden.",
    "Explain how trains are scheduled on a large network.",
]
POOL = "ours, pool rollouts"
CRITIC_FREE = {
    "grpo": f"ours, GRPO ({BATCH // GROUP} x {GROUP})",
    "rloo": f"ours, RLOO ({BATCH // GROUP} x {GROUP})",
}
BF16 = "{}, bf16"  # a row's label in bfloat16 (RLHF_PPO_DTYPE=bfloat16, TRL's bf16=True)
PHASES = ("rollout", "scoring", "old/ref forward", "training epochs", "rest of the loop")


def cheap_score(texts: list[str]) -> list[float]:
    """Share of letters that are vowels: programmatic, and negligible next to the model."""
    return [sum(c in "aeiou" for c in t) / max(sum(c.isalpha() for c in t), 1) for t in texts]


@dataclass
class Run:
    """Per measured iteration: seconds and tokens (prompt + response); seconds per phase."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    def samples_per_second(self) -> float:
        return median([BATCH / s for s in self.seconds])

    def tokens_per_second(self) -> float:
        return median([t / s for t, s in zip(self.tokens, self.seconds, strict=True)])


def _chat_prompts(tokenizer) -> list[list[int]]:  # noqa: ANN001
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in PROMPTS
    ]


@contextlib.contextmanager
def _timing(module: object, name: str, totals: dict[str, float], phase: str) -> Iterator[None]:
    """Wrap `module.name` so the seconds spent in it add up under `phase`."""
    original: Callable = getattr(module, name)

    def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[phase] = totals.get(phase, 0.0) + time.perf_counter() - started

    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, original)


def ours(
    repeats: int,
    lora_rank: int = 0,
    pool_address: str = "",
    model: str = SMOLLM2,
    algorithm: str = "ppo",
    dtype: str = "float32",
) -> Run:
    """`PPOLearner.iterate`, the trainer's own loop, timed per iteration and per phase; with
    `pool_address`, rollouts on that generation service (`PoolSampler`); `algorithm` grpo or
    rloo samples GROUP answers for each of BATCH / GROUP prompts (BATCH rollouts either way).
    `model` other than SmolLM2 (tiny-random) is for smoke runs only."""
    cache = load_config(CommonConfig).cache_dir
    tokenizer = load_tokenizer(cache)
    config = PPOConfig(
        ppo_epochs=EPOCHS,
        minibatch_size=MINIBATCH,
        learning_rate=LEARNING_RATE,
        temperature=TEMPERATURE,
        algorithm=algorithm,
        group_size=GROUP,
        dtype=dtype,
    )
    # Rollouts are the platform's own calls: they present the bench's service key.
    security = ClientSecurity(key=BENCH_KEY)
    client = GenerationClient(pool_address, security=security) if pool_address else None
    learner = online.PPOLearner(
        load_base_policy(model, cache),
        load_base_policy(model, cache),
        tokenizer,
        config,
        online.RolloutSettings(max_new_tokens=NEW_TOKENS, seed=0),
        online.LoraSettings(rank=lora_rank),
        # Nothing is published during the bench: the pool serves v0, the trainer's "latest".
        sampler=PoolSampler(client, lambda: 0) if client is not None else None,
    )
    prompts = _chat_prompts(tokenizer)[: BATCH // config.answers_per_prompt]
    prompt_tokens = sum(len(p) for p in prompts) * config.answers_per_prompt
    run, totals = Run(), {}
    with contextlib.ExitStack() as stack:
        if client is not None:
            stack.callback(client.close)
        stack.enter_context(_timing(decoding, "generate", totals, "rollout"))
        stack.enter_context(_timing(PoolSampler, "sample", totals, "rollout"))
        stack.enter_context(_timing(ppo_training, "score_rollout", totals, "old/ref forward"))
        stack.enter_context(_timing(ppo_training, "_train_epochs", totals, "training epochs"))

        def score(_prompts: list[str], responses: list[str]) -> list[float]:
            started = time.perf_counter()
            scores = cheap_score(responses)
            totals["scoring"] = totals.get("scoring", 0.0) + time.perf_counter() - started
            return scores

        learner.iterate(prompts, score)  # warm-up: allocator, threads, optimizer state
        totals.clear()
        for _ in range(repeats):
            started = time.perf_counter()
            stats = learner.iterate(prompts, score)
            run.seconds.append(time.perf_counter() - started)
            run.tokens.append(prompt_tokens + round(stats["response/length"] * BATCH))
    run.phases = {k: v / repeats for k, v in totals.items()}
    return run


class _ProgrammaticReward(nn.Module):
    """A reward "model" in the shape TRL's get_reward expects (a backbone and a score head),
    computing a programmatic score from the token ids instead of running a network."""

    base_model_prefix = "backbone"

    def __init__(self) -> None:
        super().__init__()
        self.backbone = self._ids_as_hidden

    @staticmethod
    def _ids_as_hidden(input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(hidden_states=[input_ids.unsqueeze(-1).float()])

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden.remainder(5) == 0).float()  # read at each sequence's last token


def trl(repeats: int, lora_rank: int = 0, bf16: bool = False) -> Run:
    """TRL's PPOTrainer.train() for warm-up + `repeats` iterations, timed between steps;
    `bf16`: its mixed precision (`bf16=True`)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig as TRLConfig
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    cache = load_config(CommonConfig).cache_dir
    tokenizer = load_tokenizer(cache)
    tokenizer.padding_side = "left"  # TRL's PPO queries are left-padded
    prompts = _chat_prompts(tokenizer)
    prompt_tokens = sum(len(p) for p in prompts)
    value_model = LlamaForSequenceClassification.from_pretrained(
        prepare_policy(cache), num_labels=1, dtype=torch.float32
    )
    value_model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if lora_rank:
        from peft import LoraConfig

        ours = online.LoraSettings(rank=lora_rank)  # the same adapters as ours
        peft_config = LoraConfig(
            r=lora_rank,
            lora_alpha=ours.alpha,
            target_modules=list(ours.target_modules),
            task_type="CAUSAL_LM",
        )
    run, totals, marks = Run(), {}, []
    response_tokens: list[int] = []

    class Marks(TrainerCallback):
        def on_train_begin(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            marks.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            marks.append(time.perf_counter())

    original_generation = trl_ppo.batch_generation

    def generation(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        started = time.perf_counter()
        query_responses, logits = original_generation(*args, **kwargs)
        totals.setdefault("rollout", []).append(time.perf_counter() - started)
        responses = query_responses[:, args[1].shape[1] :]
        real = ~responses.eq(tokenizer.pad_token_id)
        # Up to and including the first EOS, as TRL truncates them.
        is_eos = responses.eq(tokenizer.eos_token_id)
        real &= (is_eos.cumsum(-1) - is_eos.long()) == 0
        response_tokens.append(int(real.sum()))
        return query_responses, logits

    with tempfile.TemporaryDirectory() as folder:
        args = TRLConfig(
            output_dir=folder,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            num_mini_batches=BATCH // MINIBATCH,
            num_ppo_epochs=EPOCHS,
            response_length=NEW_TOKENS,
            total_episodes=BATCH * (repeats + 1),
            local_rollout_forward_batch_size=BATCH,
            temperature=TEMPERATURE,
            stop_token="eos",
            missing_eos_penalty=1.0,
            kl_coef=0.05,
            learning_rate=LEARNING_RATE,
            num_sample_generations=0,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            use_cpu=True,
            bf16=bf16,
            gradient_checkpointing=False,
            seed=0,
        )
        dataset = Dataset.from_dict({"input_ids": prompts})
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=load_base_policy(SMOLLM2, cache),
            ref_model=None if lora_rank else load_base_policy(SMOLLM2, cache),
            reward_model=_ProgrammaticReward(),
            train_dataset=dataset,
            value_model=value_model,
            eval_dataset=dataset,
            callbacks=[Marks()],
            peft_config=peft_config,
        )
        trainer.log = lambda *a, **k: None  # keep the console quiet; logging is not the work
        trl_ppo.batch_generation = generation
        try:
            trainer.train()
        finally:
            trl_ppo.batch_generation = original_generation
    durations = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    run.seconds = durations[1:]  # the first iteration is the warm-up
    run.tokens = [prompt_tokens + n for n in response_tokens[1:]]
    rollout = sum(totals["rollout"][1:]) / repeats
    # TRL's reference, value and reward passes and its epochs are one loop: timed together.
    run.phases = {"rollout": rollout, "rest of the loop": sum(run.seconds) / repeats - rollout}
    return run


def pool(repeats: int, model: str = SMOLLM2) -> Run:
    """`ours` with rollouts on a generation service process (its own broker and an empty
    checkpoint store, so it serves the base weights the learner starts from)."""
    with tempfile.TemporaryDirectory() as folder, EmbeddedBroker() as broker:
        bus.ensure_topics(broker.bootstrap)
        service = ServiceProcess(
            "services.generation",
            broker.bootstrap,
            {
                "RLHF_CHECKPOINT_DIR": str(Path(folder)),
                "RLHF_HTTP_PORT": "-1",
                "RLHF_POLICY_MODEL": model,
                "RLHF_GENERATION_ID_KEY": "bench-key-0123456789abcdef",
                "RLHF_MAX_BATCH": str(BATCH),
                "RLHF_BATCH_WAIT_MS": "10",
            },
        )
        try:
            return ours(repeats, pool_address=f"127.0.0.1:{service.port}", model=model)
        finally:
            service.stop()


def _speedup(run: Run, baseline: Run) -> float:
    """Iterations per second of `run` over `baseline`'s (medians)."""
    return median(baseline.seconds) / median(run.seconds)


def _baseline(label: str, results: dict[str, Run]) -> str:
    """The TRL row `label` is compared with: same precision and LoRA or not, falling back to
    fp32 TRL when that row was not measured."""
    lora = f", LoRA r={LORA_RANK}" if "LoRA" in label else ""
    same = f"TRL{lora}"
    if label.endswith(BF16.format("")) and BF16.format(same) in results:
        return BF16.format(same)
    return same if same in results else "TRL"


def _phase_rows(label: str, run: Run) -> list[list[str]]:
    total = sum(run.seconds) / len(run.seconds)  # phases are means too
    rows = []
    for phase in PHASES:
        if phase in run.phases:
            seconds = run.phases[phase]
            rows.append([label, phase, f"{seconds:.2f}", f"{100 * seconds / total:.0f}%"])
    return rows


def _rows(repeats: int) -> dict[str, Callable[[], Run]]:
    """Every row of the bench, by label, not yet measured (in the order they are run)."""
    lora = f"LoRA r={LORA_RANK}"
    return {
        "ours": lambda: ours(repeats),
        BF16.format("ours"): lambda: ours(repeats, dtype="bfloat16"),
        f"ours, {lora}": lambda: ours(repeats, lora_rank=LORA_RANK),
        BF16.format(f"ours, {lora}"): lambda: ours(repeats, lora_rank=LORA_RANK, dtype="bfloat16"),
        **{
            label: (lambda name=name: ours(repeats, algorithm=name))
            for name, label in CRITIC_FREE.items()
        },
        **{
            BF16.format(label): (lambda name=name: ours(repeats, algorithm=name, dtype="bfloat16"))
            for name, label in CRITIC_FREE.items()
        },
        POOL: lambda: pool(repeats),
        "TRL": lambda: trl(repeats),
        BF16.format("TRL"): lambda: trl(repeats, bf16=True),
        f"TRL, {lora}": lambda: trl(repeats, lora_rank=LORA_RANK),
        BF16.format(f"TRL, {lora}"): lambda: trl(repeats, lora_rank=LORA_RANK, bf16=True),
    }


def _repeats(quick: bool) -> int:
    return 2 if quick else 5


def run(quick: bool, only: Sequence[str] = ()) -> str:
    """Every row (the report BENCHMARKS.md gets), or the rows labelled in `only` (for a quick
    look while working: `python -m bench.trainer --rows "ours" "TRL"`, printed, not written)."""
    repeats = _repeats(quick)
    rows = _rows(repeats)
    unknown = [label for label in only if label not in rows]
    if unknown:
        raise ValueError(f"no row {unknown}; the rows are {list(rows)}")
    with OtherLoad() as other:
        results = {label: isolated(label, quick) for label in rows if not only or label in only}
    return report(results, repeats, other.cores)


RESULT = "bench-trainer-row "  # how a row's child process prints its measured Run


def isolated(label: str, quick: bool) -> Run:
    """Row `label` measured in a fresh Python process, as a trainer runs in production: rows
    measured one after another in one process slowed each other (ours in bf16 took 8.3 s per
    iteration right after the fp32 rows, 7.3-7.9 s alone), whatever the first rows left behind
    in the heap and caches. The child's progress goes to this process's stderr."""
    command = [sys.executable, "-m", "bench.trainer", "--measure", label]
    done = subprocess.run(
        command + (["--quick"] if quick else []), stdout=subprocess.PIPE, text=True, check=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if len(lines) != 1:
        raise RuntimeError(f"row {label!r}: its process printed no result")
    return Run(**json.loads(lines[0].removeprefix(RESULT)))


def measure(label: str, quick: bool) -> None:
    """Measure one row in this process and print it for `isolated`."""
    torch.manual_seed(0)
    measured = _rows(_repeats(quick))[label]()
    print(RESULT + json.dumps(dataclasses.asdict(measured)), flush=True)


def counted_work(label: str) -> str:
    """What one iteration of row `label` computes, as torch's FlopCounterMode counts it (matrix
    products and attention, forward and backward), split into the rollout and the rest; the mean
    of the warm-up and one more iteration. A count, not a timing: the same on any machine, so it
    tells how much of a speed ratio is less work and how much is faster work."""
    from torch.utils.flop_counter import FlopCounterMode

    if label.startswith("TRL"):
        from trl.experimental.ppo import ppo_trainer as rollout_module

        rollout_name = "batch_generation"
    else:
        rollout_module, rollout_name = decoding, "generate"
    counter = FlopCounterMode(display=False)
    in_rollouts = [0]
    original = getattr(rollout_module, rollout_name)

    def counted_rollout(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        before = counter.get_total_flops()
        try:
            return original(*args, **kwargs)
        finally:
            in_rollouts[0] += counter.get_total_flops() - before

    setattr(rollout_module, rollout_name, counted_rollout)
    try:
        with counter:
            measured = _rows(1)[label]()
    finally:
        setattr(rollout_module, rollout_name, original)
    iterations = len(measured.seconds) + 1  # and the warm-up
    total, rollout = counter.get_total_flops() / iterations, in_rollouts[0] / iterations
    return (
        f"{label}: {total / 1e9:.0f} GFLOP per iteration: rollout {rollout / 1e9:.0f}, "
        f"the rest (scoring passes, epochs) {(total - rollout) / 1e9:.0f}"
    )


def report(results: dict[str, Run], repeats: int, other_cores: float) -> str:
    """The trainer section; `other_cores`: CPU other processes used during the runs."""
    rows = []
    for label, measured in results.items():
        reference = results.get(_baseline(label, results))  # None: no TRL row measured
        versus = (
            f"{measured.samples_per_second() / reference.samples_per_second():.2f}x"
            if reference is not None
            else "-"
        )
        rows.append(
            [
                label,
                f"{median(measured.seconds):.2f}",
                f"{min(measured.seconds):.2f}",
                f"{measured.samples_per_second():.2f}",
                f"{measured.tokens_per_second():.0f}",
                versus,
                ", ".join(f"{s:.2f}" for s in measured.seconds),
            ]
        )
    phases = [r for label, m in results.items() for r in _phase_rows(label, m)]
    local, pooled = results.get("ours"), results.get(POOL)
    precision_note = "".join(
        f" {label} in bf16: {_speedup(results[BF16.format(label)], results[label]):.2f}x"
        " its fp32 iterations per second."
        for label in results
        if BF16.format(label) in results
    )
    critic_free_note = "".join(
        f" {label}: {median(local.seconds) / median(results[label].seconds):.2f}x PPO's"
        " iterations per second."
        for label in CRITIC_FREE.values()
        if label in results and local is not None
    )
    pool_note = (
        f" Pool rollouts: {pooled.samples_per_second():.2f} samples/s against "
        f"{local.samples_per_second():.2f} in-process "
        f"({pooled.samples_per_second() / local.samples_per_second():.2f}x), with the generation "
        f"service on the same {os.cpu_count()} cores as the trainer."
        if pooled is not None and local is not None
        else ""
    )
    return (
        f"### PPO, GRPO and RLOO iteration throughput, fp32 and bf16 (batch {BATCH}, minibatch "
        f"{MINIBATCH}, {NEW_TOKENS} new tokens, {EPOCHS} epochs, T={TEMPERATURE}, median of "
        f"{repeats} after a warm-up)\n\n"
        + table(
            ["trainer", "s / iteration", "fastest", "samples/s", "tokens/s", "vs TRL", "runs (s)"],
            rows,
        )
        + "\n\nAn iteration is rollout + scoring + PPO update; tokens are prompt + response tokens"
        " of the batch. Each row runs in a fresh process of its own. Rows are float32 unless"
        " marked bf16 (ours: RLHF_PPO_DTYPE=bfloat16,"
        " autocast passes over float32 weights, attention in float32 and the frozen"
        " reference's linear layers stored in bfloat16, rollouts decoded on a bfloat16 copy; TRL:"
        ' bf16=True). Each row\'s "vs TRL" is against the TRL row of the same precision, LoRA'
        " rows against TRL with the same LoRA rank and target modules."
        + precision_note
        + f" GRPO and RLOO rows (RLHF_PPO_ALGORITHM=grpo / rloo): {GROUP} answers to each of"
        f" {BATCH // GROUP} of the same prompts, so the same {BATCH} rollouts of up to"
        f" {NEW_TOKENS} tokens, scored, penalised and clipped alike, without a value head."
        + critic_free_note
        + f" Processes other than the bench used {other_cores:.2f} cores during the runs"
        + (" (other jobs were running on this shared machine)." if other_cores > 0.1 else ".")
        + pool_note
        + "\n\n"
        "### Where an iteration's time goes (mean seconds per iteration)\n\n"
        + table(["trainer", "phase", "seconds", "share"], phases)
        + '\n\nFor ours, "old/ref forward" is the policy and reference passes over the rollout'
        " (the policy's pass also serves as the first training minibatch's forward); TRL's loop"
        ' is timed as a whole apart from its rollout. With pool rollouts, "rollout" is the wait'
        " for the generation service's answers. What the profile found and what changed:"
        " [trainer-profile.md](bench/results/trainer-profile.md).\n"
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Some rows of the trainer bench, printed only.")
    rows = parser.add_mutually_exclusive_group(required=True)
    rows.add_argument("--rows", nargs="+", help="row labels, as in the table")
    rows.add_argument("--measure", help="one row, in this process (how each row is run)")
    rows.add_argument("--flops", nargs="+", help="count an iteration's FLOPs of these rows")
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    arguments = parser.parse_args()
    like_a_service()
    if arguments.measure:
        measure(arguments.measure, arguments.quick)
    elif arguments.flops:
        for label in arguments.flops:
            print(counted_work(label), flush=True)
    else:
        print(run(arguments.quick, arguments.rows), flush=True)

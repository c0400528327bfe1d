"""The alignment curve: does feedback from simulated users make SmolLM2-135M please them more?

Users: the platform's simulated users, thumbs-up when VADER reads the answer as clearly positive
(compound >= THRESHOLD). Prompts invite a complaint (traffic, taxes, queues...), so the untrained
policy is mostly rated down. Held-out prompts use topics never seen in training.

1. Feedback: the base policy answers the training prompts; the users rate every answer.
2. Reward model: MiniLM trained on those thumbs (the reward stage's trainer), normalised on the
   base policy's answers.
3. PPO (the trainer's learner, LoRA) against that reward model for TRAIN_MINUTES of wall time,
   evaluating on the held-out prompts every EVAL_EVERY_MINUTES: the users' thumbs-up rate and
   the KL to the reference (k1, summed over the answer, at the sampling temperature).

Everything runs in this process, the way the trainer and reward services run it, without Kafka:
the bench measures learning, the other areas measure the services.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from bench.report import RESULTS, machine, table
from rlhf import decoding
from rlhf.config import CommonConfig, load_config
from rlhf.models import MINILM, SMOLLM2, load_base_policy, load_reward_backbone, load_tokenizer
from rlhf.scoring import score_pairs
from rlhf.training.online import LoraSettings, PPOLearner, RolloutSettings, Scorer
from rlhf.training.ppo import build_rollout, forward_policy
from rlhf.training.ppo_config import PPOConfig
from rlhf.training.reward import Examples, Rated, RewardTrainer
from rlhf.training.reward_config import RewardTrainingConfig
from services.simulated_users.users import HELDOUT_TOPICS, TRAIN_TOPICS, prompts, sentiment

THRESHOLD = 0.5
TEMPERATURE = 0.7
NEW_TOKENS = 24
TRAIN_MINUTES = 30.0
EVAL_EVERY_MINUTES = 5.0
ANSWERS_PER_PROMPT = 2  # for the reward model's data
REWARD_MAX_TOKENS = 96


@dataclass
class Point:
    minutes: float
    updates: int
    thumbs_up: float
    sentiment: float
    kl: float
    reward: float


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt as the generation service sends a one-message chat to the model."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    seed: int,
) -> list[list[int]]:
    params = [
        decoding.Sampling(max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, seed=seed + i)
        for i in range(len(prompt_ids))
    ]
    out = []
    for start in range(0, len(prompt_ids), 16):
        chunk = slice(start, start + 16)
        completions = decoding.generate(
            policy,
            prompt_ids[chunk],
            params[chunk],
            {tokenizer.eos_token_id},
            tokenizer.pad_token_id,
        )
        out += [c.token_ids for c in completions]
    return out


def evaluate(
    learner: PPOLearner,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    ids: list[list[int]],
    score: Scorer,
) -> dict:
    """Users' thumbs-up rate, mean sentiment, reward and KL to the reference on fixed seeds."""
    policy = learner.policy
    policy.eval()
    responses = answer(policy, tokenizer, ids, seed=10_000)
    decoded = tokenizer.batch_decode(responses, skip_special_tokens=True)
    sentiments = [sentiment(t) for t in decoded]
    kls = []
    with torch.no_grad():
        for start in range(0, len(ids), 16):
            chunk = slice(start, start + 16)
            rollout = build_rollout(
                ids[chunk],
                responses[chunk],
                [0.0] * len(ids[chunk]),
                tokenizer.pad_token_id,
                tokenizer.eos_token_id,
            )
            args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_width, TEMPERATURE)
            logp, _, _ = forward_policy(policy, None, *args)
            ref, _, _ = forward_policy(learner.reference, None, *args)
            kls += ((logp - ref) * rollout.response_mask).sum(-1).tolist()
    return {
        "thumbs_up": sum(s >= THRESHOLD for s in sentiments) / len(sentiments),
        "sentiment": sum(sentiments) / len(sentiments),
        "kl": sum(kls) / len(kls),
        "reward": sum(score(texts, decoded)) / len(decoded),
        "examples": decoded[:3],
    }


def train_reward_model(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: list[str],
    train_ids: list[list[int]],
    seed: int,
) -> tuple[Scorer, float]:
    """Thumbs from the users on the base policy's answers -> a normalised reward model."""
    texts = [t for t in train_texts for _ in range(ANSWERS_PER_PROMPT)]
    ids = [i for i in train_ids for _ in range(ANSWERS_PER_PROMPT)]
    answers = tokenizer.batch_decode(answer(policy, tokenizer, ids, seed), skip_special_tokens=True)
    thumbs = [float(sentiment(a) >= THRESHOLD) for a in answers]
    model, reward_tokenizer = load_reward_backbone(MINILM, seed=seed)
    trainer = RewardTrainer(
        model,
        reward_tokenizer,
        RewardTrainingConfig(steps_per_round=150, seed=seed),
        max_tokens=REWARD_MAX_TOKENS,
    )
    examples = Examples(
        rated=[Rated(p, a, t) for p, a, t in zip(texts, answers, thumbs, strict=True)]
    )
    trainer.train(examples)
    trainer.normalise(list(zip(texts, answers, strict=True)))

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        return score_pairs(
            trainer.model,
            reward_tokenizer,
            list(zip(prompts, responses, strict=True)),
            REWARD_MAX_TOKENS,
        )

    return score, sum(thumbs) / len(thumbs)


def curve(minutes: float, eval_every: float, seed: int = 0, model: str = SMOLLM2) -> dict:
    torch.manual_seed(seed)
    cache = load_config(CommonConfig).cache_dir
    tokenizer = load_tokenizer(cache)
    train_texts, heldout_texts = prompts(TRAIN_TOPICS), prompts(HELDOUT_TOPICS)
    train_ids = [encode(tokenizer, p) for p in train_texts]
    heldout_ids = [encode(tokenizer, p) for p in heldout_texts]

    started = time.monotonic()
    base = load_base_policy(model, cache)
    score, feedback_rate = train_reward_model(base, tokenizer, train_texts, train_ids, seed)
    reward_minutes = (time.monotonic() - started) / 60
    learner = PPOLearner(
        base,
        load_base_policy(model, cache),
        tokenizer,
        PPOConfig(
            ppo_epochs=2,
            minibatch_size=4,
            learning_rate=2e-4,
            temperature=TEMPERATURE,
            init_kl_coef=0.1,
            target_kl=5.0,
            # Per-update feedback that can double or halve the coefficient within ~45 updates:
            # at TRL's horizon (10k samples) it barely moves in a 30-minute CPU run, and a
            # trial run overshot 10 nats at minute 5.
            kl_horizon=200,
            seed=seed,
        ),
        RolloutSettings(max_new_tokens=NEW_TOKENS, seed=seed),
        LoraSettings(rank=16, alpha=32.0),
    )
    points = [
        Point(0.0, 0, **_numbers(evaluate(learner, tokenizer, heldout_texts, heldout_ids, score)))
    ]
    print(f"untrained: {points[0]}", flush=True)
    order = random.Random(seed)
    trained = 0.0  # minutes spent in PPO iterations; evaluations do not count
    next_eval = eval_every
    result: dict = {}
    while trained < minutes:
        started = time.monotonic()
        batch = order.sample(range(len(train_ids)), 8)
        learner.iterate(
            [train_ids[i] for i in batch], score, prompt_texts=[train_texts[i] for i in batch]
        )
        trained += (time.monotonic() - started) / 60
        if trained >= next_eval or trained >= minutes:
            result = evaluate(learner, tokenizer, heldout_texts, heldout_ids, score)
            points.append(Point(trained, learner.updates, **_numbers(result)))
            print(f"{points[-1]} {result['examples'][:2]}", flush=True)
            next_eval += eval_every
    return {
        "points": points,
        "feedback_rate": feedback_rate,
        "reward_minutes": reward_minutes,
        "examples": result["examples"],
    }


def _numbers(result: dict) -> dict:
    return {k: result[k] for k in ("thumbs_up", "sentiment", "kl", "reward")}


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [p.minutes for p in points]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(minutes, [100 * p.thumbs_up for p in points], "o-", color="tab:green")
    left.set_xlabel("PPO training time (minutes, 2 CPU cores)")
    left.set_ylabel("thumbs-up rate on held-out prompts (%)", color="tab:green")
    right = left.twinx()
    right.plot(minutes, [p.kl for p in points], "s--", color="tab:red")
    right.set_ylabel("KL to the reference (nats)", color="tab:red")
    left.set_title("SmolLM2-135M aligned to simulated users' thumbs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(quick: bool) -> str:
    minutes, every = (3.0, 1.5) if quick else (TRAIN_MINUTES, EVAL_EVERY_MINUTES)
    result = curve(minutes, every)
    points = result["points"]
    png = RESULTS / "alignment.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(points, png)
    (RESULTS / "alignment.json").write_text(json.dumps([p.__dict__ for p in points], indent=1))
    first, last = points[0], points[-1]
    rows = [
        [
            f"{p.minutes:.1f}",
            p.updates,
            f"{100 * p.thumbs_up:.1f}%",
            f"{p.sentiment:+.3f}",
            f"{p.reward:+.2f}",
            f"{p.kl:.2f}",
        ]
        for p in points
    ]
    setup = (
        f"Users: thumbs-up when VADER compound >= {THRESHOLD}. "
        f"{len(prompts(TRAIN_TOPICS))} training prompts, {len(prompts(HELDOUT_TOPICS))} "
        f"held-out prompts on unseen topics, answers of up to {NEW_TOKENS} tokens at temperature "
        f"{TEMPERATURE}. Reward model: MiniLM trained on the users' {ANSWERS_PER_PROMPT} thumbs "
        f"per training prompt on base-policy answers ({100 * result['feedback_rate']:.0f}% up; "
        f"{result['reward_minutes']:.1f} min). PPO: LoRA rank 16, batch 8, minibatch 4, "
        "2 epochs, lr 2e-4, adaptive KL (initial 0.1, target 5 nats, horizon 200). Minutes count "
        "PPO iterations only "
        "(evaluations excluded)."
    )
    gain = 100 * (last.thumbs_up - first.thumbs_up)
    verdict = (
        f"**Thumbs-up rate {100 * first.thumbs_up:.1f}% -> {100 * last.thumbs_up:.1f}% "
        f"({gain:+.1f} points) after {last.minutes:.0f} min, KL {last.kl:.2f} nats.** "
        "Target: +30 points with KL under 10 nats. Each point rates one answer per held-out "
        f"prompt ({len(prompts(HELDOUT_TOPICS))}), so a rate carries about +-7 points of "
        "sampling noise: read the trend, not one point."
    )
    endings = " / ".join(f"_{e.strip()}_" for e in result["examples"][:3])
    return "\n".join(
        [
            f"Machine: {machine()}.",
            "",
            setup,
            "",
            table(
                ["minutes", "PPO updates", "thumbs-up", "sentiment", "reward", "KL (nats)"], rows
            ),
            "",
            verdict,
            "",
            "Held-out answers at the end: " + endings,
            "",
            "![alignment curve](bench/results/alignment.png)",
        ]
    )

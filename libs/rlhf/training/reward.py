"""Reward-model training from live feedback, with no I/O: examples, rounds, held-out gate.

The trainer service feeds generation and feedback events in; this module turns them into
training examples, keeps a stable held-out split, and runs rounds. A round trains the candidate
model on everything collected so far, evaluates it and the served (incumbent) model on the same
held-out set, and promotes the candidate only if it does not regress; otherwise the candidate is
reset to the incumbent, so a bad round cannot be built upon. A promoted model gets the
normalisation (shift, scale) that maps its scores on reference-policy samples to mean 0, std 1.

Feedback becomes examples as follows (see `rlhf.algorithms.reward` for the losses):

| feedback | example |
|---|---|
| thumb up / down | `Rated(target=1 / 0)`: logistic loss |
| scalar score in [0, 1] | `Rated(target=score)`: logistic loss with a soft label |
| ranking of n generations | `Pair(better, worse)` for each ordered pair of known generations |
| correction | `Pair(correction, the corrected answer)` |
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.algorithms import reward as algo
from rlhf.joining import FeedbackJoin, Joined
from rlhf.models import NORMALISATION, encode_reward_inputs, set_reward_normalisation
from rlhf.scoring import reward_prompt
from rlhf.training import Interrupted, Stopping, never
from rlhf.training.reward_config import RewardTrainingConfig
from rlhf.v1 import events_pb2

# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """`chosen` was preferred to `rejected` as an answer to `prompt`."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Rated:
    """An unpaired judgement: target 1 = desirable (thumbs-up), 0 = not; in between = a score."""

    prompt: str
    response: str
    target: float


Example = Pair | Rated


@dataclass(frozen=True)
class Labelled:
    """An example and the generation id that decides its split (held-out or train)."""

    key: str
    example: Example


class FeedbackExamples:
    """Joins feedback to generations (`FeedbackJoin`, which also drops duplicate feedback) and
    turns each joined piece into labelled examples.

    Rankings name several generations; those the join still holds are looked up there
    (bounded), and unknown ones are left out of the pairs (counted).
    """

    def __init__(self, max_pending: int = 50_000) -> None:
        self.join = FeedbackJoin(max_pending)
        self.unresolved_ranked = 0

    def add_generation(self, event: events_pb2.GenerationEvent) -> list[Labelled]:
        return self._examples(self.join.add_generation(event))

    def add_feedback(self, event: events_pb2.FeedbackEvent) -> list[Labelled]:
        return self._examples(self.join.add_feedback(event))

    def _examples(self, joined: list[Joined]) -> list[Labelled]:
        labelled = []
        for item in joined:
            key = item.generation.generation_id
            labelled += [Labelled(key, example) for example in self._convert(item)]
        return labelled

    def _convert(self, joined: Joined) -> list[Example]:
        generation, feedback = joined.generation, joined.feedback.feedback
        prompt = reward_prompt(generation)
        signal = feedback.WhichOneof("signal")
        if signal == "thumb" and feedback.thumb in (events_pb2.THUMB_UP, events_pb2.THUMB_DOWN):
            target = 1.0 if feedback.thumb == events_pb2.THUMB_UP else 0.0
            return [Rated(prompt, generation.response, target)]
        if signal == "score" and math.isfinite(feedback.score.value):
            return [Rated(prompt, generation.response, min(max(feedback.score.value, 0.0), 1.0))]
        if signal == "correction" and feedback.correction.text.strip():
            return [Pair(prompt, feedback.correction.text, generation.response)]
        if signal == "ranking":
            return self._ranking_pairs(prompt, list(feedback.ranking.generation_ids))
        return []

    def _ranking_pairs(self, prompt: str, ranked_ids: list[str]) -> list[Example]:
        """Every (better, worse) pair of a best-first ranking, among generations we know."""
        found = [self.join.generation(g) for g in ranked_ids]
        known = [g.response for g in found if g is not None]
        self.unresolved_ranked += len(ranked_ids) - len(known)
        return [
            Pair(prompt, known[i], known[j])
            for i in range(len(known))
            for j in range(i + 1, len(known))
            if known[i] != known[j]
        ]


class ReferenceSamples:
    """A uniform sample (reservoir) of answers from the oldest policy version seen.

    The served reward is normalised on the reference policy's answers, the distribution PPO
    starts from; version 0 is the base policy. If an older version than the one held turns up,
    the sample starts over with it. Thread-safe.
    """

    def __init__(self, capacity: int = 512, seed: int = 0) -> None:
        self.capacity = capacity
        self.policy_version: int | None = None
        self._samples: list[tuple[str, str]] = []
        self._offered = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def add(self, generation: events_pb2.GenerationEvent) -> None:
        version = generation.policy_version
        sample = (reward_prompt(generation), generation.response)
        with self._lock:
            if self.policy_version is None or version < self.policy_version:
                self.policy_version, self._samples, self._offered = version, [], 0
            if version != self.policy_version:
                return
            self._offered += 1
            if len(self._samples) < self.capacity:
                self._samples.append(sample)
                return
            slot = self._rng.randrange(self._offered)
            if slot < self.capacity:
                self._samples[slot] = sample

    def samples(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._samples)

    def state(self) -> dict[str, Any]:
        """Everything it holds, as JSON (for the reward stage's checkpoints)."""
        with self._lock:
            version, internal, gauss = self._rng.getstate()
            return {
                "policy_version": self.policy_version,
                "offered": self._offered,
                "samples": [list(sample) for sample in self._samples],
                "rng": [version, list(internal), gauss],
            }

    def restore(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.policy_version = state["policy_version"]
            self._offered = int(state["offered"])
            self._samples = [(str(p), str(r)) for p, r in state["samples"]]
            version, internal, gauss = state["rng"]
            self._rng.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------
# Dataset with a stable held-out split
# --------------------------------------------------------------------------------------------


def in_heldout(key: str, fraction: float) -> bool:
    """Whether generation id `key` belongs to the held-out split.

    A hash, not a random draw: the same generation is always on the same side, in every round
    and after a restart, so a model is never evaluated on what it (or its parent) trained on.
    """
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class Examples:
    pairs: list[Pair] = field(default_factory=list)
    rated: list[Rated] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs) + len(self.rated)

    def add(self, example: Example) -> None:
        (self.pairs if isinstance(example, Pair) else self.rated).append(example)


@dataclass(frozen=True)
class DataSnapshot:
    train: Examples
    heldout: Examples
    fresh: Examples  # everything added since the previous snapshot, from both splits


class FeedbackDataset:
    """Training and held-out examples, newest kept when full. Thread-safe."""

    def __init__(
        self, heldout_fraction: float = 0.2, max_train: int = 20_000, max_heldout: int = 1_000
    ) -> None:
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.heldout_fraction = heldout_fraction
        self._train: deque[Example] = deque(maxlen=max_train)
        self._heldout: deque[Example] = deque(maxlen=max_heldout)
        self._fresh: deque[Example] = deque(maxlen=max_heldout)
        self._lock = threading.Lock()

    def add(self, labelled: Iterable[Labelled]) -> int:
        added = 0
        with self._lock:
            for item in labelled:
                side = self._heldout if in_heldout(item.key, self.heldout_fraction) else self._train
                side.append(item.example)
                self._fresh.append(item.example)
                added += 1
        return added

    @property
    def fresh(self) -> int:
        """Examples added since the last snapshot."""
        with self._lock:
            return len(self._fresh)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {"train": len(self._train), "heldout": len(self._heldout)}

    def snapshot(self) -> DataSnapshot:
        """Copies of both splits, and the fresh examples (which are then no longer fresh)."""
        with self._lock:
            parts = (self._train, self._heldout, self._fresh)
            train, heldout, fresh = (_split_kinds(p) for p in parts)
            self._fresh.clear()
        return DataSnapshot(train, heldout, fresh)

    def state(self) -> dict[str, list[list[Any]]]:
        """Both splits and the fresh examples, as JSON (for the reward stage's checkpoints)."""
        with self._lock:
            return {
                "train": [example_json(e) for e in self._train],
                "heldout": [example_json(e) for e in self._heldout],
                "fresh": [example_json(e) for e in self._fresh],
            }

    def restore(self, state: dict[str, list[list[Any]]]) -> None:
        with self._lock:
            for name, side in (("train", self._train), ("heldout", self._heldout)):
                side.clear()
                side.extend(example_from_json(row) for row in state[name])
            self._fresh.clear()
            self._fresh.extend(example_from_json(row) for row in state["fresh"])


def example_json(example: Example) -> list[Any]:
    if isinstance(example, Pair):
        return ["pair", example.prompt, example.chosen, example.rejected]
    return ["rated", example.prompt, example.response, example.target]


def example_from_json(row: list[Any]) -> Example:
    kind, prompt, text, other = row
    if kind == "pair":
        return Pair(str(prompt), str(text), str(other))
    if kind == "rated":
        return Rated(str(prompt), str(text), float(other))
    raise ValueError(f"unknown example kind {kind!r}")


def _split_kinds(examples: Iterable[Example]) -> Examples:
    result = Examples()
    for example in examples:
        result.add(example)
    return result


# --------------------------------------------------------------------------------------------
# Training rounds
# --------------------------------------------------------------------------------------------


def gate(
    candidate: algo.Placements,
    incumbent: algo.Placements | None,
    confidence: float,
    tolerance: float,
    min_heldout: int,
) -> tuple[list[str], dict[str, float]]:
    """Why the candidate must not be served (empty: it may), and the comparisons behind it.

    The arguments are the `algo.Placements` of the same held-out examples: how well each model
    orders them (pairs, and thumbs-up against thumbs-down). The candidate must rank them better
    than chance with `confidence`: the lower bound of its ranking score's advantage over 0.5
    (`algo.ranking_difference`) above 0. Against the served model (`incumbent`, None while only
    the untrained head is served) it is refused when it ranks worse by more than `tolerance`
    with `confidence`. So a small held-out set publishes a model that clearly orders answers as
    users do, refuses one that clearly orders them worse than what serves, and waits on noise.

    Ranking, not calibration: the reward service normalises scores on reference answers and PPO
    learns from how rewards differ, so a model's use is its ordering. (A Brier score against the
    base rate, this gate's first test before, tests calibration and ranking together: with
    thumbs-up at 28% a candidate ordering users' thumbs at AUC 0.75 beats the base rate's Brier
    score by about 0.02, and `make up` refused such candidates for 9 to 12 rounds.)
    """
    n = len(candidate)
    reasons = []
    if n < min_heldout:
        reasons.append(f"only {n} held-out examples (at least {min_heldout} are needed)")
    vs_chance = algo.ranking_difference(candidate, None, confidence)
    ranking = 0.5 + vs_chance.mean
    stats = {
        "gate/heldout": float(n),
        "gate/ranking": ranking,
        "gate/vs_chance_lower": vs_chance.lower,
    }
    if not vs_chance.lower > 0:
        reasons.append(
            f"does not rank answers better than chance with {confidence:.0%} confidence: "
            f"ranking score {ranking:.3f} (at least {0.5 + vs_chance.lower:.3f}) on {n} "
            "held-out examples"
        )
    if incumbent is not None:
        vs_served = algo.ranking_difference(candidate, incumbent, confidence)
        stats["gate/ranking_served"] = ranking - vs_served.mean
        stats["gate/vs_served_upper"] = vs_served.upper
        if vs_served.upper < -tolerance:
            reasons.append(
                f"ranking score {ranking:.3f} vs served {stats['gate/ranking_served']:.3f}: "
                f"worse with {confidence:.0%} confidence (difference at most "
                f"{vs_served.upper:+.3f} < -{tolerance})"
            )
    return reasons, stats


@dataclass(frozen=True)
class RoundResult:
    promoted: bool
    reasons: list[str]  # why not promoted
    candidate: dict[str, float]  # held-out metrics
    incumbent: dict[str, float]
    agreement: dict[str, float]  # served model on fresh (never trained on) feedback
    train: dict[str, float]
    normalisation: tuple[float, float] | None  # of the promoted model
    gate: dict[str, float] = field(default_factory=dict)  # the comparisons behind the verdict


def freeze_lower_layers(model: PreTrainedModel, trainable_layers: int) -> None:
    """Train only the top `trainable_layers` encoder layers, the pooler and the head.

    The lower layers of a pretrained sentence encoder already give good features, and freezing
    them makes a step several times cheaper (no backward pass through them). BERT-family only.
    """
    if trainable_layers < 0:
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    layers = model.base_model.encoder.layer
    for layer in list(layers)[max(0, len(layers) - trainable_layers) :]:
        layer.requires_grad_(True)
    if getattr(model.base_model, "pooler", None) is not None:
        model.base_model.pooler.requires_grad_(True)
    model.classifier.requires_grad_(True)


class RewardTrainer:
    """The candidate reward model, the served (incumbent) one, and the round logic."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: RewardTrainingConfig,
        max_tokens: int = 256,
        incumbent_trained: bool = False,
    ) -> None:
        """`max_tokens`: (prompt, answer) pairs are truncated to this many tokens, as the
        reward service truncates what it scores (RLHF_REWARD_MAX_TOKENS). `incumbent_trained`:
        `model` is a published reward model (the served one to beat), not the untrained head."""
        self.model = model
        self.incumbent_trained = incumbent_trained
        self.tokenizer = tokenizer
        self.config = config
        self.max_tokens = max_tokens
        self.incumbent = _frozen_copy(model)
        freeze_lower_layers(self.model, config.trainable_layers)
        self.optimizer = self._new_optimizer()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.steps = 0
        self.rounds = 0
        self._incumbent_cache: dict[tuple[str, str], float] = {}

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            params, lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )

    # -- scoring ------------------------------------------------------------------------------

    def raw_scores(
        self,
        model: PreTrainedModel,
        prompts: Sequence[str],
        responses: Sequence[str],
        cache: dict[tuple[str, str], float] | None = None,
    ) -> torch.Tensor:
        """Unnormalised scores [N] in eval mode, in chunks; `cache` remembers (prompt, response)
        scores of a model that does not change (the incumbent)."""
        pairs = list(zip(prompts, responses, strict=True))
        missing = [p for p in dict.fromkeys(pairs) if cache is None or p not in cache]
        found: dict[tuple[str, str], float] = {}
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(missing), self.config.eval_batch_size):
                chunk = missing[start : start + self.config.eval_batch_size]
                scores = self._forward(model, [p for p, _ in chunk], [r for _, r in chunk])
                found.update(zip(chunk, scores.tolist(), strict=True))
        model.train(was_training)
        if cache is not None:
            cache.update(found)
            found = cache
        return torch.tensor([found[p] for p in pairs], dtype=torch.float32)

    def _forward(
        self, model: PreTrainedModel, prompts: Sequence[str], responses: Sequence[str]
    ) -> torch.Tensor:
        encoded = encode_reward_inputs(self.tokenizer, prompts, responses, self.max_tokens)
        return model(**encoded).logits[:, 0].float()

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, model: PreTrainedModel, examples: Examples) -> dict[str, float]:
        """Pairwise accuracy on pairs; AUC, Brier and ECE on unpaired judgements (NaN if none)."""
        return self.judge(model, examples)[0]

    def judge(
        self, model: PreTrainedModel, examples: Examples
    ) -> tuple[dict[str, float], algo.Placements]:
        """`evaluate`'s metrics, and how well the model orders each example (`algo.Placements`):
        the gate compares models example by example."""
        cache = self._incumbent_cache if model is self.incumbent else None
        metrics = {"pairs": float(len(examples.pairs)), "rated": float(len(examples.rated))}
        pairs = examples.pairs
        chosen = self.raw_scores(model, [p.prompt for p in pairs], [p.chosen for p in pairs], cache)
        rejected = self.raw_scores(
            model, [p.prompt for p in pairs], [p.rejected for p in pairs], cache
        )
        metrics["pairwise_accuracy"] = algo.pairwise_accuracy(chosen, rejected)
        rated = examples.rated
        scores = self.raw_scores(
            model, [r.prompt for r in rated], [r.response for r in rated], cache
        )
        targets = torch.tensor([r.target for r in rated], dtype=torch.float32)
        probabilities = torch.sigmoid(scores)
        metrics["thumbs_auc"] = algo.roc_auc(scores, targets >= 0.5)
        metrics["brier"] = algo.brier_score(probabilities, targets)
        metrics["ece"] = algo.expected_calibration_error(probabilities, targets)
        return metrics, algo.placements(chosen, rejected, scores, targets >= 0.5)

    # -- training -----------------------------------------------------------------------------

    def steps_for(self, examples: int) -> int:
        """A round's steps: `steps_per_round`, but at most `epochs_per_round` passes over the
        training examples. A round on a few dozen examples then takes a few steps, not 80 over
        each example again and again: measured on SmolLM2's answers rated by the simulated
        users, 80 steps on 100 examples gave a Brier score of 0.34, worse than the base rate's
        0.24 (overconfident), 25 steps 0.225."""
        passes = math.ceil(self.config.epochs_per_round * examples / self.config.batch_size)
        return max(1, min(self.config.steps_per_round, passes))

    def train(self, examples: Examples, stopping: Stopping = never) -> dict[str, float]:
        """`steps_for(len(examples))` steps on batches drawn uniformly from `examples`;
        `Interrupted` if `stopping()` before a step (the steps taken stay in the model)."""
        if not len(examples):
            return {}
        # Dropout stays off (eval mode): steps are reproducible from the seed, and the function
        # trained is the one evaluated and served.
        self.model.eval()
        steps = self.steps_for(len(examples))
        totals: dict[str, float] = {}
        for done in range(steps):
            if stopping():
                raise Interrupted(f"stopped after {done} of {steps} steps")
            stats = self.step(self._draw(examples))
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + value
        return {name: value / steps for name, value in totals.items()} | {"steps": float(steps)}

    def _draw(self, examples: Examples) -> Examples:
        size = len(examples)
        picks = torch.randint(size, (min(self.config.batch_size, size),), generator=self.generator)
        batch = Examples()
        for index in picks.tolist():
            if index < len(examples.pairs):
                batch.add(examples.pairs[index])
            else:
                batch.add(examples.rated[index - len(examples.pairs)])
        return batch

    def step(self, batch: Examples) -> dict[str, float]:
        """One gradient step on a batch of pairs and rated answers, in one forward pass."""
        pairs, rated = batch.pairs, batch.rated
        prompts = [p.prompt for p in pairs] * 2 + [r.prompt for r in rated]
        responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        responses += [r.response for r in rated]
        scores = self._forward(self.model, prompts, responses)
        n = len(pairs)
        loss = torch.zeros(())
        stats: dict[str, float] = {}
        if pairs:
            pair_loss = algo.bradley_terry_loss(scores[:n], scores[n : 2 * n])
            loss = loss + self.config.pair_weight * pair_loss
            stats["loss/pairs"] = pair_loss.item()
        if rated:
            targets = torch.tensor([r.target for r in rated])
            rated_loss = algo.binary_feedback_loss(
                scores[2 * n :],
                targets,
                self.config.desirable_weight,
                self.config.undesirable_weight,
            )
            loss = loss + self.config.rated_weight * rated_loss
            stats["loss/rated"] = rated_loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        stats["loss/total"] = loss.item()
        return stats

    # -- rounds -------------------------------------------------------------------------------

    def round(
        self,
        data: DataSnapshot,
        reference: Sequence[tuple[str, str]],
        stopping: Stopping = never,
    ) -> RoundResult:
        """Measure the served model on fresh feedback, train, evaluate both on held-out data,
        then promote the candidate (normalised on `reference`) or reset it to the incumbent.

        `stopping` is asked before each training step and before the evaluation: if it says
        so, the round is given up (`Interrupted`): the candidate is reset to the incumbent and
        the round is not counted, as if it had not started."""
        self.rounds += 1
        try:
            agreement = self.evaluate(self.incumbent, data.fresh) if len(data.fresh) else {}
            train_stats = self.train(data.train, stopping)
            if stopping():
                raise Interrupted("stopped before the held-out evaluation")
        except Interrupted:
            self.rounds -= 1
            self.reset_to_incumbent()
            raise
        candidate, candidate_placed = self.judge(self.model, data.heldout)
        incumbent, incumbent_placed = self.judge(self.incumbent, data.heldout)
        reasons, comparisons = gate(
            candidate_placed,
            incumbent_placed if self.incumbent_trained else None,
            self.config.gate_confidence,
            self.config.tolerance,
            self.config.min_heldout,
        )
        if reasons:
            self.reset_to_incumbent()
            return RoundResult(
                False, reasons, candidate, incumbent, agreement, train_stats, None, comparisons
            )
        shift_scale = self.normalise(reference)
        self.incumbent = _frozen_copy(self.model)
        self.incumbent_trained = True
        self._incumbent_cache = {}
        return RoundResult(
            True, [], candidate, incumbent, agreement, train_stats, shift_scale, comparisons
        )

    def normalise(self, reference: Sequence[tuple[str, str]]) -> tuple[float, float]:
        """Set the candidate's normalisation from its scores on reference-policy answers."""
        if reference:
            scores = self.raw_scores(
                self.model, [p for p, _ in reference], [r for _, r in reference]
            )
            shift, scale = algo.normalisation(scores)
        else:
            shift, scale = 0.0, 1.0
        set_reward_normalisation(self.model, shift, scale)
        return shift, scale

    def reset_to_incumbent(self) -> None:
        """Throw the candidate's round away: incumbent weights and a fresh optimizer."""
        self.model.load_state_dict(self.incumbent.state_dict())
        served = getattr(self.incumbent.config, NORMALISATION, None)
        if served is None:
            self.model.config.__dict__.pop(NORMALISATION, None)
        else:
            setattr(self.model.config, NORMALISATION, dict(served))
        self.optimizer = self._new_optimizer()


def _frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    return copy.deepcopy(model).eval().requires_grad_(False)

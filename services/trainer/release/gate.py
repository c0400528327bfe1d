"""The release stage's offline gate: a new policy against the incumbent, before any user sees it.

Both policies are loaded from the store here and answer the gate's prompts
(`rlhf.training.release_gate`); the reward service scores both sets of answers; the pure
`rlhf.algorithms.release_gate.compare` decides. The stage loads models for this alone: the
reference once, on the first gate, and each compared policy only while it is measured (its
answers are kept, a few versions' worth, so an incumbent is sampled once however many
candidates it meets; rewards are asked afresh each time, so both sides of a comparison are
scored by the same reward model).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import Counter, Gauge
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.algorithms.release_gate import GateMeasures, GateTolerance, compare
from rlhf.checkpoints import POLICY, CheckpointError, CheckpointStore
from rlhf.clients import Scores
from rlhf.models import policy_from_checkpoint, policy_in_dtype
from rlhf.training.release_gate import Answers, GateSampler, gate_measures

log = logging.getLogger(__name__)

KEEP_ANSWERS = 4  # policies' answers kept (the incumbent's, mostly)

GATES = Counter(
    "rlhf_release_gate_total",
    "new policies compared with the incumbent before their canary, by result (passed, refused)",
    ["result"],
)
REFUSALS = Counter(
    "rlhf_release_gate_refusals_total",
    "candidates refused by the release gate, by the measure that regressed (one refusal may "
    "count under several)",
    ["measure"],
)
for _result in ("passed", "refused"):
    GATES.labels(_result)
for _measure in ("reward", "length", "repetition", "kl"):
    REFUSALS.labels(_measure)
MEASURES = Gauge(
    "rlhf_release_gate_measure",
    "the last gate's means on its prompt set, per policy (candidate, incumbent) and measure "
    "(reward, length in tokens, repetition: repeated-bigram share, kl: nats to the reference)",
    ["policy", "measure"],
)


class ReleaseGate:
    """Measures and compares two policy versions (`run`)."""

    def __init__(
        self,
        store: CheckpointStore,
        tokenizer: Callable[[], PreTrainedTokenizerBase],
        base_policy: Callable[[], PreTrainedModel],
        reference: Callable[[], PreTrainedModel],
        score: Callable[[list[str], list[str]], Scores],
        prompts: tuple[str, ...],
        samples: int,
        max_new_tokens: int,
        tolerance: GateTolerance,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """`dtype`: the weights both policies are sampled and the reference run in (bfloat16
        roughly halves the gate's time on a CPU with AMX)."""
        self._store = store
        self._tokenizer = tokenizer
        self._base_policy = base_policy
        self._reference = reference
        self._score = score
        self._prompts, self._samples, self._max_new_tokens = prompts, samples, max_new_tokens
        self.tolerance = tolerance
        self._dtype = dtype
        self._sampler: GateSampler | None = None  # built on the first gate (loads the reference)
        self._answers: OrderedDict[int, Answers] = OrderedDict()

    def run(self, incumbent: int, candidate: int) -> dict[str, Any]:
        """The comparison, as the release state keeps it (`ReleaseGate` in trainer.proto, as a
        dict). Raises `RewardUnavailable` when the reward service cannot score (try later).
        A candidate that cannot be loaded is refused; an incumbent that cannot (pruned from the
        store) leaves nothing to compare with: the candidate passes, and the summary says so."""
        self._start()  # a reference that fails to load is no fault of the candidate's
        try:
            theirs = self._answers_of(candidate)
        except (CheckpointError, KeyError, ValueError) as exc:  # missing, corrupt, not a policy
            return self._outcome(incumbent, candidate, False, f"cannot be loaded ({exc})")
        try:
            ours = self._answers_of(incumbent)
        except (CheckpointError, KeyError, ValueError) as exc:
            log.warning("release gate: incumbent v%d cannot be loaded: %s", incumbent, exc)
            return self._outcome(
                incumbent, candidate, True, f"not compared: v{incumbent} cannot be loaded ({exc})"
            )
        measured, baseline, reward_version = gate_measures(theirs, ours, self._score)
        verdict = compare(measured, baseline, self.tolerance)
        for policy, measures in (("candidate", measured), ("incumbent", baseline)):
            for name in ("reward", "length", "repetition", "kl"):
                value = getattr(measures, name)
                if value is not None:
                    MEASURES.labels(policy, name).set(value)
        for name in verdict.failed:
            REFUSALS.labels(name).inc()
        summary = "; ".join(verdict.reasons) if verdict.reasons else "no regression"
        return self._outcome(
            incumbent,
            candidate,
            verdict.passed,
            summary,
            failed=list(verdict.failed),
            measures=(measured, baseline),
            reward_version=reward_version,
        )

    def _outcome(
        self,
        incumbent: int,
        candidate: int,
        passed: bool,
        why: str,
        failed: list[str] | None = None,
        measures: tuple[GateMeasures, GateMeasures] | None = None,
        reward_version: int = 0,
    ) -> dict[str, Any]:
        GATES.labels("passed" if passed else "refused").inc()
        word = "passed the gate" if passed else "refused by the gate"
        outcome: dict[str, Any] = {
            "candidate_version": candidate,
            "incumbent_version": incumbent,
            "passed": passed,
            "summary": f"v{candidate} {word} against v{incumbent}: {why}",
            "failed": failed or [],
            "reward_model_version": reward_version,
        }
        if measures is not None:
            for key, m in zip(("candidate", "incumbent"), measures, strict=True):
                outcome[key] = {
                    "reward": m.reward or 0.0,
                    "reward_scored": m.reward is not None,
                    "length": m.length,
                    "repetition": m.repetition,
                    "kl": m.kl,
                }
        log.info("release gate: %s", outcome["summary"])
        return outcome

    def _start(self) -> GateSampler:
        if self._sampler is None:
            self._sampler = GateSampler(
                self._tokenizer(),
                policy_in_dtype(self._reference(), self._dtype),
                self._prompts,
                self._samples,
                self._max_new_tokens,
            )
        return self._sampler

    def _answers_of(self, version: int) -> Answers:
        if version in self._answers:
            self._answers.move_to_end(version)
            return self._answers[version]
        sampler = self._start()
        if version == 0:
            policy = self._base_policy()
        else:
            policy = policy_from_checkpoint(self._store.load(POLICY, version))
        answers = sampler.answers(policy_in_dtype(policy, self._dtype))
        del policy
        self._answers[version] = answers
        while len(self._answers) > KEEP_ANSWERS:
            self._answers.popitem(last=False)
        return answers

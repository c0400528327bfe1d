"""The offline release gate's comparison (rlhf.algorithms.release_gate) on hand-made numbers."""

import pytest

from rlhf.algorithms.release_gate import (
    GateMeasures,
    GateTolerance,
    compare,
    repeated_ngrams,
)

INCUMBENT = GateMeasures(reward=0.40, length=30.0, repetition=0.05, kl=1.0, reward_sd=0.5)
TOLERANCE = GateTolerance(reward=0.5, length=0.5, repetition=0.1, max_kl=0.0)  # reward: 0.25


def _candidate(**changes):
    fields = {"reward": 0.40, "length": 30.0, "repetition": 0.05, "kl": 1.0, "reward_sd": 0.5}
    return GateMeasures(**{**fields, **changes})


def test_repeated_ngrams_counts_bigrams_seen_before():
    assert repeated_ngrams([1, 2, 3, 4, 5]) == 0.0
    assert repeated_ngrams([7, 7, 7, 7, 7]) == pytest.approx(3 / 4)  # (7,7) four times: 3 repeats
    assert repeated_ngrams([1, 2, 1, 2, 1]) == pytest.approx(2 / 4)  # (1,2),(2,1),(1,2),(2,1)
    assert repeated_ngrams([1, 2, 3, 1, 2, 3], n=3) == pytest.approx(1 / 4)
    assert repeated_ngrams([4]) == 0.0 and repeated_ngrams([]) == 0.0
    with pytest.raises(ValueError):
        repeated_ngrams([1, 2], n=0)


def test_a_candidate_like_the_incumbent_passes():
    verdict = compare(_candidate(), INCUMBENT, TOLERANCE)
    assert verdict.passed and verdict.reasons == ()


def test_within_every_tolerance_passes():
    candidate = _candidate(reward=0.16, length=44.0, repetition=0.14, kl=40.0)
    assert compare(candidate, INCUMBENT, TOLERANCE).passed


@pytest.mark.parametrize(
    ("changes", "failed"),
    [
        ({"reward": 0.14}, ("reward",)),  # 0.26 lower, tolerance 0.25
        ({"length": 46.0}, ("length",)),  # 53% longer
        ({"length": 14.0}, ("length",)),  # 53% shorter
        ({"repetition": 0.16}, ("repetition",)),  # 11 points more repeated bigrams
        ({"reward": -1.0, "repetition": 0.9}, ("reward", "repetition")),
    ],
)
def test_a_regression_beyond_tolerance_is_refused_and_named(changes, failed):
    verdict = compare(_candidate(**changes), INCUMBENT, TOLERANCE)
    assert not verdict.passed
    assert verdict.failed == failed  # each reason starts with its measure
    assert len(verdict.reasons) == len(failed)


def test_a_better_candidate_is_never_refused_for_being_better():
    candidate = _candidate(reward=3.0, repetition=0.0)
    assert compare(candidate, INCUMBENT, TOLERANCE).passed


@pytest.mark.parametrize("scale", [0.01, 1.0, 40.0])
def test_the_reward_tolerance_is_in_standard_deviations_whatever_the_reward_models_scale(scale):
    # One pair of policies scored by reward models that differ only by a positive scale (a new
    # reward model version): the verdict is the same under every scale.
    def scaled(m):
        return GateMeasures(m.reward * scale, m.length, m.repetition, m.kl, m.reward_sd * scale)

    incumbent = scaled(INCUMBENT)
    worse = compare(scaled(_candidate(reward=0.10)), incumbent, TOLERANCE)  # 0.6 sd lower
    assert worse.failed == ("reward",)
    assert "lower by 0.60 sd" in worse.reasons[0]
    assert compare(scaled(_candidate(reward=0.20)), incumbent, TOLERANCE).passed  # 0.4 sd


def test_the_spread_is_pooled_over_both_policies():
    # A candidate that collapsed to one answer (sd 0) is judged against the pooled spread
    # sqrt((0 + 0.5^2) / 2) = 0.354, not its own.
    collapsed = _candidate(reward=0.40 - 0.5 * 0.354 - 0.01, reward_sd=0.0)
    assert compare(collapsed, INCUMBENT, TOLERANCE).failed == ("reward",)
    assert compare(_candidate(reward=0.25, reward_sd=0.0), INCUMBENT, TOLERANCE).passed


def test_with_no_spread_at_all_any_drop_in_reward_is_refused():
    flat = GateMeasures(reward=0.40, length=30.0, repetition=0.05, kl=1.0, reward_sd=0.0)
    lower = compare(_candidate(reward=0.39, reward_sd=0.0), flat, TOLERANCE)
    assert lower.failed == ("reward",) and "every answer alike" in lower.reasons[0]
    assert compare(_candidate(reward=0.40, reward_sd=0.0), flat, TOLERANCE).passed


def test_kl_is_capped_only_when_a_cap_is_set():
    far = _candidate(kl=12.0)
    assert compare(far, INCUMBENT, TOLERANCE).passed
    capped = compare(far, INCUMBENT, GateTolerance(max_kl=10.0))
    assert capped.failed == ("kl",)
    assert compare(_candidate(kl=9.0), INCUMBENT, GateTolerance(max_kl=10.0)).passed


def test_reward_is_not_compared_without_a_reward_model():
    unscored = GateMeasures(reward=None, length=30.0, repetition=0.05, kl=1.0)
    assert compare(unscored, INCUMBENT, TOLERANCE).passed
    assert compare(_candidate(reward=-5.0), unscored, TOLERANCE).passed


def test_tolerances_must_not_be_negative():
    with pytest.raises(ValueError, match="reward"):
        GateTolerance(reward=-0.1)
    with pytest.raises(ValueError, match="max_kl"):
        GateTolerance(max_kl=float("nan"))


# The measurements (rlhf.training.release_gate) on the tiny random policy -----------------------


def test_the_shipped_prompts_are_none_the_simulated_users_ask():
    from rlhf.training.release_gate import GATE_PROMPTS, GATE_TOPICS
    from services.simulated_users import synthetic, users

    asked = set(users.PROMPTS) | set(users.HELDOUT_PROMPTS) | set(synthetic.PROMPTS)
    assert GATE_PROMPTS and not set(GATE_PROMPTS) & asked
    topics = set(users.TRAIN_TOPICS) | set(users.HELDOUT_TOPICS)
    assert not any(topic in prompt for prompt in GATE_PROMPTS for topic in topics)
    assert len(set(GATE_TOPICS)) == len(GATE_TOPICS)


def test_a_prompt_file_replaces_the_shipped_set(tmp_path):
    from rlhf.training.release_gate import GATE_PROMPTS, MAX_PROMPTS, load_prompts

    assert load_prompts("") == GATE_PROMPTS
    path = tmp_path / "prompts.txt"
    path.write_text("Tell me a joke.\n\n  What is rain?  \n")
    assert load_prompts(str(path)) == ("Tell me a joke.", "What is rain?")
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(path))
    path.write_text("x\n" * (MAX_PROMPTS + 1))
    with pytest.raises(ValueError, match="at most"):
        load_prompts(str(path))


@pytest.fixture(scope="module")
def tiny(cache_dir):
    from rlhf.models import TINY, load_base_policy, load_tokenizer

    return load_tokenizer(cache_dir), load_base_policy(TINY, cache_dir)


def test_a_policy_measured_against_itself_has_no_kl_and_the_same_answers(tiny):
    from rlhf.training.release_gate import GateSampler

    tokenizer, reference = tiny
    sampler = GateSampler(tokenizer, reference, ["Say hello.", "Count to three."], 2, 8)
    first, again = sampler.answers(reference), sampler.answers(reference)
    assert first == again  # seeded per answer: the same policy answers the same
    assert len(first.texts) == 4 and first.prompts[:2] == ["Say hello.", "Say hello."]
    assert 0 < first.length <= 8 and 0.0 <= first.repetition < 1.0
    assert first.kl == pytest.approx(0.0, abs=1e-3)


def test_a_sharper_policy_diverges_from_the_reference(tiny):
    import copy

    import torch

    from rlhf.training.release_gate import GateSampler

    tokenizer, reference = tiny
    sharper = copy.deepcopy(reference)  # the random model's near-uniform logits, scaled up
    with torch.no_grad():
        sharper.lm_head.weight.mul_(30.0)
    sampler = GateSampler(tokenizer, reference, ["Say hello.", "Count to three."], 2, 8)
    assert sampler.answers(sharper).kl > 1.0  # nats per answer of up to 8 tokens


def test_both_policies_are_scored_in_one_call_by_one_reward_model():
    from rlhf.clients import Scores
    from rlhf.training.release_gate import Answers, gate_measures

    candidate = Answers(["p", "q"], ["good", "fine"], 10.0, 0.1, 2.0)
    incumbent = Answers(["p", "q"], ["bad", "bad"], 12.0, 0.0, 1.0)
    calls = []

    def score(prompts, texts, version=3):
        calls.append((prompts, texts))
        return Scores([{"good": 1.0, "fine": 0.0, "bad": -1.0}[t] for t in texts], version)

    cand, inc, version = gate_measures(candidate, incumbent, score)
    assert calls == [(["p", "q", "p", "q"], ["good", "fine", "bad", "bad"])]
    assert (cand, inc, version) == (  # each with its answers' rewards' spread (1 and 0: 0.5)
        GateMeasures(0.5, 10.0, 0.1, 2.0, reward_sd=0.5),
        GateMeasures(-1.0, 12.0, 0.0, 1.0, reward_sd=0.0),
        3,
    )
    untrained = gate_measures(candidate, incumbent, lambda p, t: score(p, t, version=0))
    assert untrained[0].reward is None and untrained[1].reward is None

"""The drift sample: which live generations are scored, and what the metrics then say."""

import random

from prometheus_client import REGISTRY

from rlhf.drift import in_sample, record_live_rewards
from services.simulated_users.synthetic import generation_event

RNG = random.Random(1)


def _value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_sample_is_a_stable_fraction_of_generation_ids():
    ids = [f"{RNG.getrandbits(128):032x}" for _ in range(4000)]
    sampled = [i for i in ids if in_sample(i, 0.1)]
    assert 0.085 < len(sampled) / len(ids) < 0.115
    assert sampled == [i for i in ids if in_sample(i, 0.1)]
    assert all(in_sample(i, 1.0) for i in ids[:50])
    assert not any(in_sample(i, 0.0) for i in ids[:50])


def test_sampled_generations_are_scored_by_policy_and_reward_version():
    events = [generation_event("How was your weekend?", f"answer {i}", 41, RNG) for i in range(5)]
    asked = []

    def score(batch):
        asked.extend(batch)
        return [1.25] * len(batch), 3

    labels = {"policy_version": "41", "reward_version": "3"}
    count_before = _value("rlhf_reward_live_score_count", **labels)
    sum_before = _value("rlhf_reward_live_sum", **labels)
    assert record_live_rewards(events, fraction=1.0, score=score, chunk=2) == 5
    # The reward model is asked about the user's words, not the chat template.
    assert asked == [("How was your weekend?", f"answer {i}") for i in range(5)]
    assert _value("rlhf_reward_live_score_count", **labels) == count_before + 5
    assert _value("rlhf_reward_live_count", **labels) == count_before + 5
    assert _value("rlhf_reward_live_sum", **labels) == sum_before + 5 * 1.25
    assert _value("rlhf_reward_live_score_bucket", le="1.5", **labels) == count_before + 5
    assert _value("rlhf_reward_live_score_bucket", le="1.0", **labels) == 0


def test_unsampled_and_failed_generations_are_counted_not_scored():
    events = [generation_event("How was your weekend?", f"x {i}", 42, RNG) for i in range(40)]
    expected = sum(in_sample(e.generation_id, 0.5) for e in events)
    skipped_before = _value("rlhf_reward_live_events_total", outcome="skipped")
    failed_before = _value("rlhf_reward_live_events_total", outcome="failed")

    def broken(batch):
        raise RuntimeError("reward model down")

    assert record_live_rewards(events, fraction=0.5, score=broken) == 0
    assert _value("rlhf_reward_live_events_total", outcome="skipped") == (
        skipped_before + 40 - expected
    )
    assert _value("rlhf_reward_live_events_total", outcome="failed") == failed_before + expected

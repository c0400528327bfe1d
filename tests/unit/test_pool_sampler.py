"""PoolSampler's staleness bound against a scripted pool (the client is the unit seam; the real
generation server is in tests/integration/test_pool_rollouts.py)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from rlhf import decoding
from rlhf.clients import PoolCompletion, RewardUnavailable, RolloutsUnavailable
from rlhf.training.pool import PoolSampler, StaleRollouts


class ScriptedPool:
    """Answers call k with versions[k] for every row (the last entry repeats)."""

    def __init__(self, *versions: int | list[int]) -> None:
        self.versions = list(versions)
        self.calls: list[tuple[list[list[int]], list[int | None]]] = []

    def rollouts(self, prompts, params):  # noqa: ANN001, ANN201
        self.calls.append(([list(p) for p in prompts], [p.seed for p in params]))
        version = self.versions[min(len(self.calls) - 1, len(self.versions) - 1)]
        per_row = version if isinstance(version, list) else [version] * len(prompts)
        return [
            PoolCompletion([prompt[0], 2], [-0.5, -1.0], decoding.EOS, v)
            for prompt, v in zip(prompts, per_row, strict=True)
        ]


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _sampler(pool, latest=5, lag=1, max_wait=10.0, **kwargs) -> tuple[PoolSampler, FakeTime]:
    fake = FakeTime()
    sampler = PoolSampler(
        pool,
        lambda: latest,
        max_policy_lag=lag,
        max_wait=max_wait,
        retry_interval=1.0,
        clock=fake.clock,
        sleep=fake.sleep,
        **kwargs,
    )
    return sampler, fake


def _batch(n: int) -> tuple[list[list[int]], list[decoding.Sampling]]:
    prompts = [[10 + row, 1] for row in range(n)]
    return prompts, [
        decoding.Sampling(max_new_tokens=4, temperature=0.7, seed=row) for row in range(n)
    ]


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_fresh_rollouts_keep_their_version_tokens_and_logprobs():
    pool = ScriptedPool([5, 4, 5])
    sampler, fake = _sampler(pool)
    samples_before = _metric("rlhf_trainer_pool_samples_total")
    lag_count_before = _metric("rlhf_trainer_policy_lag_count")
    out = sampler.sample(*_batch(3))
    assert out.policy_versions == [5, 4, 5] and out.latest_version == 5 and out.max_lag == 1
    assert [c.token_ids for c in out.completions] == [[10, 2], [11, 2], [12, 2]]
    assert all(c.logprobs == [-0.5, -1.0] and c.finish_reason == "eos" for c in out.completions)
    assert len(pool.calls) == 1 and not fake.sleeps
    assert _metric("rlhf_trainer_pool_samples_total") == samples_before + 3
    assert _metric("rlhf_trainer_policy_lag_count") == lag_count_before + 3


def test_stale_rows_are_discarded_and_asked_again_with_their_own_prompt_and_seed():
    # V=5, L=1: row 1 from v3 is too old; the pool has reloaded by the second call.
    pool = ScriptedPool([5, 3, 4], 5)
    sampler, fake = _sampler(pool)
    stale_before = _metric("rlhf_trainer_pool_stale_samples_total")
    out = sampler.sample(*_batch(3))
    assert out.policy_versions == [5, 5, 4]
    assert pool.calls[1] == ([[11, 1]], [1])
    assert fake.sleeps == [1.0]
    assert _metric("rlhf_trainer_pool_stale_samples_total") == stale_before + 1


def test_a_pool_that_stays_stale_is_a_clear_error_after_the_bounded_wait():
    pool = ScriptedPool(2)
    sampler, fake = _sampler(pool, latest=5, lag=1, max_wait=3.0)
    with pytest.raises(StaleRollouts, match=r"older than v4 .*max lag 1\).*; 2 of 2"):
        sampler.sample(*_batch(2))
    assert fake.now == pytest.approx(3.0) and len(pool.calls) == 4
    # The training loop puts a batch back and retries later on RewardUnavailable.
    assert issubclass(StaleRollouts, RolloutsUnavailable)
    assert issubclass(RolloutsUnavailable, RewardUnavailable)


def test_a_replica_ahead_of_the_trainer_raises_the_floor_so_a_batch_spans_at_most_lag_versions():
    # The trainer believes V=4, but one replica already serves v6: v4 is now 2 behind.
    pool = ScriptedPool([4, 6], 6)
    sampler, _ = _sampler(pool, latest=4, lag=1)
    out = sampler.sample(*_batch(2))
    assert out.policy_versions == [6, 6] and out.max_lag == 0


def test_lag_zero_accepts_only_the_latest_version():
    pool = ScriptedPool([5, 4], 5)
    sampler, _ = _sampler(pool, lag=0)
    assert sampler.sample(*_batch(2)).policy_versions == [5, 5]


def test_large_batches_go_to_the_pool_in_bounded_waves():
    pool = ScriptedPool(5)
    sampler, _ = _sampler(pool, max_in_flight=4)
    out = sampler.sample(*_batch(10))
    assert [len(prompts) for prompts, _ in pool.calls] == [4, 4, 2]
    assert [c.token_ids[0] for c in out.completions] == list(range(10, 20))


@pytest.mark.parametrize(
    "kwargs", [{"max_policy_lag": -1}, {"max_wait": -1.0}, {"retry_interval": 0.0}]
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PoolSampler(ScriptedPool(0), lambda: 0, **kwargs)

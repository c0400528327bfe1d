"""Dynamic batching of Score calls: coalesced, bounded in size, wait and queue, never split."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from prometheus_client import REGISTRY

from rlhf.batching import Overloaded, ShuttingDown
from rlhf.models import TINY, load_reward_backbone, set_reward_normalisation
from rlhf.scoring import ScoreBatcher, score_pairs


class GatedScorer:
    """Scores a pair as len(response); the first batch blocks until `release` is set, so tests
    can queue requests behind a busy model deterministically."""

    def __init__(self, version=7):
        self.batches = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.version = version

    def __call__(self, pairs):
        self.batches.append(list(pairs))
        self.started.set()
        self.release.wait(10)
        return [float(len(r)) for _, r in pairs], self.version


def pairs(*responses):
    return [("p", r) for r in responses]


@pytest.fixture
def gated():
    scorer = GatedScorer()
    batcher = ScoreBatcher(scorer, max_batch=4, max_wait_s=0.0, max_queued=8)
    batcher.start()
    yield scorer, batcher
    scorer.release.set()
    batcher.stop()


def _queue_behind_busy_model(scorer, batcher, requests):
    """Submit one blocking request, then `requests` more while the model is busy."""
    pool = ThreadPoolExecutor(max_workers=len(requests) + 1)
    first = pool.submit(batcher.submit, pairs("x"))
    assert scorer.started.wait(5)
    futures = []
    for request in requests:
        futures.append(pool.submit(batcher.submit, request))
        time.sleep(0.02)  # keep the queue order deterministic
    deadline = time.monotonic() + 5
    while batcher.queued_pairs < sum(len(r) for r in requests) and time.monotonic() < deadline:
        time.sleep(0.01)
    scorer.release.set()
    results = [f.result(5) for f in futures]
    first.result(5)
    pool.shutdown()
    return results


def test_requests_queued_while_the_model_is_busy_share_one_forward_pass(gated):
    scorer, batcher = gated
    results = _queue_behind_busy_model(scorer, batcher, [pairs("ab"), pairs("abc"), pairs("a")])
    assert [len(b) for b in scorer.batches] == [1, 3]
    # Each caller gets its own scores back, in its own order, with the model version.
    assert results == [([2.0], 7), ([3.0], 7), ([1.0], 7)]


def test_a_batch_never_exceeds_the_bound_and_a_request_is_never_split(gated):
    scorer, batcher = gated
    results = _queue_behind_busy_model(
        scorer, batcher, [pairs("a", "b", "c"), pairs("dd", "ee"), pairs("f")]
    )
    # 3 + 2 > 4: the second request waits for the next pass, where 2 + 1 fit.
    assert [len(b) for b in scorer.batches] == [1, 3, 3]
    assert results == [([1.0, 1.0, 1.0], 7), ([2.0, 2.0], 7), ([1.0], 7)]


def test_a_lone_request_is_not_held_back_for_companions():
    scorer = GatedScorer()
    scorer.release.set()
    batcher = ScoreBatcher(scorer, max_batch=64, max_wait_s=1.0)
    batcher.start()
    try:
        started = time.monotonic()
        assert batcher.submit(pairs("abc")) == ([3.0], 7)
        elapsed = time.monotonic() - started
    finally:
        batcher.stop()
    assert elapsed < 0.5  # nobody was on the way, so the 1 s wait did not apply


def test_a_call_on_its_way_is_waited_for_within_the_bound():
    scorer = GatedScorer()
    scorer.release.set()
    batcher = ScoreBatcher(scorer, max_batch=64, max_wait_s=2.0)
    batcher.start()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            with batcher.arriving() as arrival:  # a second call is being validated
                first = pool.submit(batcher.submit, pairs("a"))
                time.sleep(0.05)
                second = pool.submit(batcher.submit, pairs("bb"), None, arrival)
            results = [first.result(5), second.result(5)]
    finally:
        batcher.stop()
    assert results == [([1.0], 7), ([2.0], 7)]
    assert [len(b) for b in scorer.batches] == [2]  # the first waited and shared the pass


def test_a_full_batch_goes_without_waiting():
    scorer = GatedScorer()
    scorer.release.set()
    batcher = ScoreBatcher(scorer, max_batch=3, max_wait_s=2.0)
    batcher.start()
    try:
        with ThreadPoolExecutor(max_workers=3) as pool, batcher.arriving():
            futures = [pool.submit(batcher.submit, pairs("a" * n)) for n in (1, 2, 3)]
            results = sorted(f.result(5)[0][0] for f in futures)
    finally:
        batcher.stop()
    # Someone was still "arriving" all along: the batch went because it was full, so no one
    # waited the 2 s (the results came inside the 5 s bound of the context above).
    assert results == [1.0, 2.0, 3.0]
    assert sum(len(b) for b in scorer.batches) == 3


def test_a_full_queue_is_refused_at_once(gated):
    scorer, batcher = gated
    pool = ThreadPoolExecutor(max_workers=3)
    busy = pool.submit(batcher.submit, pairs("x"))
    assert scorer.started.wait(5)
    queued = pool.submit(batcher.submit, pairs(*"abcdefgh"))  # 8 = max_queued
    deadline = time.monotonic() + 5
    while batcher.queued_pairs < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Overloaded):
        batcher.submit(pairs("y"))
    scorer.release.set()
    assert queued.result(5)[0] == [1.0] * 8
    busy.result(5)
    pool.shutdown()


def test_a_scoring_error_reaches_every_caller_of_the_batch_and_the_worker_survives():
    calls = []

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return [0.5] * len(batch), 1

    batcher = ScoreBatcher(flaky, max_batch=8, max_wait_s=0.0)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="exploded"):
            batcher.submit(pairs("a"))
        assert batcher.submit(pairs("b", "c")) == ([0.5, 0.5], 1)
    finally:
        batcher.stop()


def _forward_seconds() -> tuple[float, float]:
    count = REGISTRY.get_sample_value("rlhf_reward_forward_seconds_count") or 0.0
    return count, REGISTRY.get_sample_value("rlhf_reward_forward_seconds_sum") or 0.0


def test_each_batch_scored_is_timed_and_a_failed_one_is_not():
    """rlhf_reward_forward_seconds: what a Score call's latency is made of, from the inside."""
    outcomes = iter([RuntimeError("model exploded"), None])

    def slow(batch):
        failure = next(outcomes)
        if failure is not None:
            raise failure
        time.sleep(0.05)
        return [0.5] * len(batch), 1

    batcher = ScoreBatcher(slow, max_batch=8, max_wait_s=0.0)
    batcher.start()
    count, total = _forward_seconds()
    try:
        with pytest.raises(RuntimeError, match="exploded"):
            batcher.submit(pairs("a"))
        assert _forward_seconds() == (count, total)
        batcher.submit(pairs("b", "c"))
    finally:
        batcher.stop()
    after_count, after_total = _forward_seconds()
    assert after_count == count + 1
    assert 0.05 <= after_total - total < 1.0


def test_stop_finishes_queued_work_then_refuses_new_work(gated):
    scorer, batcher = gated
    pool = ThreadPoolExecutor(max_workers=2)
    busy = pool.submit(batcher.submit, pairs("x"))
    assert scorer.started.wait(5)
    queued = pool.submit(batcher.submit, pairs("abc"))
    while batcher.queued_pairs < 1:
        time.sleep(0.01)
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    time.sleep(0.05)
    with pytest.raises(ShuttingDown):
        batcher.submit(pairs("late"))
    scorer.release.set()
    stopper.join(5)
    assert queued.result(5) == ([3.0], 7) and busy.result(5) == ([1.0], 7)
    pool.shutdown()


def test_served_scores_apply_the_models_normalisation():
    model, tokenizer = load_reward_backbone(TINY)
    batch = [("How was it?", "great"), ("How was it?", "awful")]
    raw = torch.tensor(score_pairs(model, tokenizer, batch, max_tokens=32))
    set_reward_normalisation(model, shift=0.5, scale=4.0)
    served = torch.tensor(score_pairs(model, tokenizer, batch, max_tokens=32))
    assert torch.allclose(served, (raw - 0.5) / 4.0, atol=1e-6)


def test_bf16_scores_stay_close_to_float32():
    """bfloat16 keeps 8 bits of mantissa: the raw score moves by well under 1% of its size. (On
    the served scale that depends on the model's spread of scores: `python -m bench reward`
    reports it for a trained MiniLM.)"""
    model, tokenizer = load_reward_backbone(TINY)
    answers = ["great", "awful", "fine I guess", "the best day ever", "meh", "terrible, sorry"]
    batch = [("How was it?", answer) for answer in answers]
    exact = torch.tensor(score_pairs(model, tokenizer, batch, max_tokens=32))
    fast = torch.tensor(score_pairs(model.to(torch.bfloat16), tokenizer, batch, max_tokens=32))
    assert fast.dtype is torch.float32  # normalised in float32
    assert ((fast - exact).abs() <= 0.01 * exact.abs()).all()

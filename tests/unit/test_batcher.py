"""The generation batcher's per-step (continuous) batching on a tiny random model: joining a
running batch, leaving it, the KV budget, the bounded queue, hot swap between steps."""

import os
import threading
import time

import pytest
import torch

from rlhf.batching import ContinuousBatcher, Job, Overloaded, PolicyLoader, PolicyWeights
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.decoding import Sampling, generate
from rlhf.models import (
    cast_packed,
    cast_policy,
    on_own_thread,
    policy_checkpoint_files,
    policy_from_checkpoint,
    serving_dtype,
)
from rlhf.serving import HotSwap, Served
from tests.conftest import tiny_llama

PAD = 0


def _model(seed):
    return tiny_llama(seed, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model():
    return _model(0)


def _batcher(model, **options):
    slot = HotSwap("policy", Served(PolicyWeights(model, model), 1, "", time.time()))
    batcher = ContinuousBatcher(slot, eos_ids=set(), pad_id=PAD, **options)
    return batcher, slot


class Tokens:
    """Records (job name, token) in the order the batcher emits them, and signals the first."""

    def __init__(self):
        self.order = []
        self.first = {}

    def job(self, name, prompt, sampling):
        self.first[name] = threading.Event()

        def on_token(token, _logprob):
            self.order.append(name)
            self.first[name].set()

        return Job(prompt, sampling, on_token=on_token)


def _alone(model, job):
    return generate(model, [job.prompt_ids], [job.sampling], set(), PAD)[0].token_ids


def test_request_joins_the_running_batch_and_leaves_when_done(model):
    batcher, _ = _batcher(model)
    tokens = Tokens()
    long = tokens.job("long", [5, 6, 7], Sampling(60, 1.0, seed=1))
    short = tokens.job("short", [8, 9, 10, 11], Sampling(4, 1.0, seed=2))
    batcher.start()
    try:
        long_future = batcher.submit(long)
        assert tokens.first["long"].wait(10)
        short_result = batcher.submit(short).result(10)
        # `short` joined between two of `long`'s steps and left while `long` went on.
        assert not long_future.done()
        long_result = long_future.result(30)
    finally:
        batcher.stop()
    assert short_result.batch_size == 2
    first_short = tokens.order.index("short")
    assert "long" in tokens.order[first_short:], "short waited for the whole long request"
    assert short_result.completion.token_ids == _alone(model, short)
    assert long_result.completion.token_ids == _alone(model, long)
    assert batcher.running() == 0


def test_kv_budget_holds_a_request_back_until_there_is_room(model):
    one = 3 + 10  # prompt + max_new_tokens of each request
    batcher, _ = _batcher(model, kv_budget_tokens=one + 5)
    tokens = Tokens()
    first = tokens.job("first", [1, 2, 3], Sampling(10, 0.0))
    second = tokens.job("second", [4, 5, 6], Sampling(10, 0.0))
    batcher.start()
    try:
        futures = [batcher.submit(first), batcher.submit(second)]
        results = [f.result(30) for f in futures]
    finally:
        batcher.stop()
    assert tokens.order == ["first"] * 10 + ["second"] * 10
    assert [r.batch_size for r in results] == [1, 1]


def test_request_larger_than_the_budget_is_refused(model):
    batcher, _ = _batcher(model, kv_budget_tokens=8)
    with pytest.raises(ValueError, match="KV budget"):
        batcher.submit(Job([1, 2, 3], Sampling(6, 0.0)))


def test_full_queue_is_overloaded(model):
    batcher, _ = _batcher(model, max_queue=2)  # not started: nothing leaves the queue
    batcher.submit(Job([1], Sampling(2, 0.0)))
    batcher.submit(Job([1], Sampling(2, 0.0)))
    with pytest.raises(Overloaded):
        batcher.submit(Job([1], Sampling(2, 0.0)))


def test_rows_are_bounded_by_max_batch(model):
    batcher, _ = _batcher(model, max_batch=2)
    jobs = [Job([1, 2], Sampling(6, 1.0, seed=s)) for s in range(5)]
    batcher.start()
    try:
        results = [batcher.submit(job) for job in jobs]
        sizes = [f.result(30).batch_size for f in results]
    finally:
        batcher.stop()
    assert max(sizes) <= 2


def test_hot_swap_lands_between_steps_and_requests_keep_their_version(model):
    other = _model(1)
    batcher, slot = _batcher(model)
    tokens = Tokens()
    old = tokens.job("old", [5, 6, 7], Sampling(40, 1.0, seed=3))
    new = tokens.job("new", [5, 6, 7], Sampling(8, 1.0, seed=3))
    batcher.start()
    try:
        old_future = batcher.submit(old)
        assert tokens.first["old"].wait(10)
        slot.swap(Served(PolicyWeights(other, other), 2, "", time.time()))
        new_result = batcher.submit(new).result(10)
        assert not old_future.done()  # both versions decoded side by side
        old_result = old_future.result(30)
    finally:
        batcher.stop()
    assert (old_result.policy_version, new_result.policy_version) == (1, 2)
    assert old_result.completion.token_ids == _alone(model, old)
    assert new_result.completion.token_ids == _alone(other, new)


def test_abandoned_request_leaves_the_batch(model):
    batcher, _ = _batcher(model)
    tokens = Tokens()
    job = tokens.job("gone", [1, 2, 3], Sampling(400, 1.0, seed=1))
    batcher.start()
    try:
        future = batcher.submit(job)
        assert tokens.first["gone"].wait(10)
        job.abandon()
        deadline = time.monotonic() + 10
        while batcher.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.running() == 0
        assert not future.done() and tokens.order.count("gone") < 400
    finally:
        batcher.stop()


def test_stop_finishes_queued_work_and_then_refuses(model):
    batcher, _ = _batcher(model)
    futures = [batcher.submit(Job([1, 2], Sampling(5, 0.0))) for _ in range(3)]
    batcher.start()
    batcher.stop()
    assert all(len(f.result(0).completion.token_ids) == 5 for f in futures)
    with pytest.raises(Exception, match="shutting down"):
        batcher.submit(Job([1, 2], Sampling(5, 0.0)))


def test_decode_dtype_setting():
    assert serving_dtype("float32") is torch.float32
    assert serving_dtype("bfloat16") is torch.bfloat16
    native = torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported()
    assert serving_dtype("auto") is (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError):
        serving_dtype("float16")


# bfloat16 keeps 8 bits of mantissa: logits move by ~1e-2 relative, so a token's logprob moves
# by a few hundredths of a nat. Stated bound per token, and a tighter one on the mean.
BF16_LOGPROB_MAX, BF16_LOGPROB_MEAN = 0.15, 0.03


def test_bf16_decode_logprobs_stay_close_to_float32_and_rollouts_stay_exact(model):
    weights = PolicyWeights.of(model, torch.bfloat16)
    assert weights.exact is model and weights.fast.dtype is torch.bfloat16
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights.fast.state_dict()[name], tensor.to(torch.bfloat16)), name
    batcher, slot = _batcher(model)
    slot.swap(Served(weights, 2, "", time.time()))
    prompt, sampling = [5, 6, 7, 8], Sampling(24, 1.0, seed=9)
    batcher.start()
    try:
        fast = batcher.submit(Job(prompt, sampling)).result(30).completion
        exact = batcher.submit(Job(prompt, sampling, exact=True)).result(30).completion
    finally:
        batcher.stop()
    alone = generate(model, [prompt], [sampling], set(), PAD)[0]
    assert exact.token_ids == alone.token_ids and exact.logprobs == alone.logprobs
    # The fp32 model's logprobs of the tokens the bf16 weights chose (teacher forcing).
    ids = torch.tensor([prompt + fast.token_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    reference = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt) :, None])[:, 0]
    difference = (torch.tensor(fast.logprobs) - reference).abs()
    assert difference.max() < BF16_LOGPROB_MAX and difference.mean() < BF16_LOGPROB_MEAN
    assert difference.max() > 0  # the bf16 weights really were used


def _tied_policy(seed):
    return tiny_llama(seed, tie_word_embeddings=True)


def test_hot_reload_reuses_a_retired_versions_memory_once_nothing_decodes_on_it(tmp_path):
    store = CheckpointStore(tmp_path)
    versions = [store.write(POLICY, *policy_checkpoint_files(_tied_policy(s))) for s in range(4)]
    busy: set = set()
    loader = PolicyLoader(torch.bfloat16, lambda weights: weights in busy)

    def load(manifest):
        checkpoint = store.load(POLICY, manifest.version, manifest.sha256, loader.reuse())
        return loader.build(checkpoint)

    first = loader.initial(load(versions[0]))
    second = load(versions[1])  # nothing retired yet: built afresh
    busy.add(first)
    third = load(versions[2])  # the retired version still decodes: built afresh
    assert third.exact is not first.exact
    busy.clear()
    fourth = load(versions[3])  # `second` retired and free: its memory holds version 4 now
    assert fourth.exact is second.exact and fourth.fast is second.fast
    assert second.packed is not None and fourth.packed is second.packed  # one copy refreshed it
    assert fourth.buffers["model.safetensors"] is second.buffers["model.safetensors"]
    fresh = PolicyWeights.of(
        policy_from_checkpoint(store.load(POLICY, 4, versions[3].sha256)), torch.bfloat16
    )
    for name, tensor in fresh.exact.state_dict().items():
        assert torch.equal(fourth.exact.state_dict()[name], tensor), name
        assert torch.equal(fourth.fast.state_dict()[name], fresh.fast.state_dict()[name]), name
    assert fourth.fast.lm_head.weight is fourth.fast.model.embed_tokens.weight
    prompt, sampling = [5, 6, 7], Sampling(12, 1.0, seed=4)
    assert _alone(fourth.fast, Job(prompt, sampling)) == _alone(fresh.fast, Job(prompt, sampling))


def test_weights_read_from_the_store_are_cast_as_one_tensor_that_one_copy_refreshes(tmp_path):
    store = CheckpointStore(tmp_path)
    first, second = (store.write(POLICY, *policy_checkpoint_files(_tied_policy(s))) for s in (0, 1))
    checkpoint = store.load(POLICY, first.version, first.sha256)
    exact = policy_from_checkpoint(checkpoint)
    fast, packed = cast_policy(exact, torch.bfloat16)
    assert packed is not None and fast.lm_head.weight is fast.model.embed_tokens.weight
    start, end = packed.cast.data_ptr(), packed.cast.data_ptr() + packed.cast.nbytes
    weights = {k: v for k, v in exact.state_dict().items() if k != "lm_head.weight"}
    assert packed.cast.numel() == sum(v.numel() for v in weights.values())
    assert packed.cast.device == packed.source.device and packed.cast.dtype is torch.bfloat16
    for name, tensor in weights.items():
        cast = fast.state_dict()[name]
        assert start <= cast.data_ptr() < end, name  # a view of the one cast tensor
        assert torch.equal(cast, tensor.to(torch.bfloat16)), name
    # The next version read into the same memory: the float32 weights change in place, and one
    # copy brings every bfloat16 weight up to date.
    before = fast.model.embed_tokens.weight.clone()
    store.load(POLICY, second.version, second.sha256, checkpoint.buffers)
    assert torch.equal(fast.model.embed_tokens.weight, before)  # not refreshed yet
    packed.refresh()
    assert not torch.equal(fast.model.embed_tokens.weight, before)
    for name, tensor in exact.state_dict().items():
        assert torch.equal(fast.state_dict()[name], tensor.to(torch.bfloat16)), name
    # Weights in memory of their own, or a file's tensors with one left out, are cast one by one.
    separate = _tied_policy(0)
    cast, none = cast_policy(separate, torch.bfloat16)
    assert none is None and torch.equal(
        cast.model.norm.weight, separate.model.norm.weight.bfloat16()
    )
    gap = dict(weights)
    gap.pop("model.layers.0.mlp.up_proj.weight")
    assert cast_packed(gap, torch.bfloat16) is None
    assert cast_policy(exact, torch.float32) == (exact, None)


def _os_threads():
    """Threads of this process once the count holds still (exiting workers take a moment)."""
    count, deadline = len(os.listdir("/proc/self/task")), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = len(os.listdir("/proc/self/task"))
        if now == count:
            break
        count = now
    return count


def _parallel_work():
    torch.set_num_threads(2)  # this thread's OpenMP team: itself and one worker
    return float((torch.ones(1 << 22) * 2).sum())  # big enough to run in parallel


def test_torch_work_on_a_thread_of_its_own_takes_its_openmp_workers_with_it():
    threads = torch.get_num_threads()
    try:
        warm = threading.Thread(target=_parallel_work)  # torch's one-off threads start here
        warm.start()
        warm.join()
        before = _os_threads()
        # The hazard: a thread that ran a parallel region keeps OpenMP workers while it lives.
        done, stay = threading.Event(), threading.Event()
        lingering = threading.Thread(target=lambda: (_parallel_work(), done.set(), stay.wait()))
        lingering.start()
        done.wait(10)
        assert _os_threads() >= before + 2  # the thread and its worker
        stay.set()
        lingering.join()
        assert _os_threads() == before
        # on_own_thread: the result comes back, and nothing is left running after it.
        assert on_own_thread(_parallel_work) == 2.0 * (1 << 22)
        assert _os_threads() == before
        with pytest.raises(ValueError, match="refused"):
            on_own_thread(lambda: int("refused"))
    finally:
        torch.set_num_threads(threads)

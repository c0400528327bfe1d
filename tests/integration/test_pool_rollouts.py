"""PPO rollouts on a real generation server over loopback (tiny model, session broker): the
rollout API, the staleness bound of PoolSampler, and the importance-sampling correction."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from rlhf import bus, decoding
from rlhf.algorithms.ppo import truncated_importance_weights
from rlhf.auth import ClientSecurity
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.clients import GenerationClient, RewardUnavailable
from rlhf.models import (
    TINY,
    load_base_policy,
    load_tokenizer,
    policy_checkpoint_files,
    policy_from_checkpoint,
)
from rlhf.training.online import PPOLearner, RolloutSettings
from rlhf.training.pool import PoolRollouts, PoolSampler, StaleRollouts
from rlhf.training.ppo import build_rollout, forward_policy
from rlhf.training.ppo_config import PPOConfig
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc
from services.generation.main import GenerationService
from tests.conftest import (
    SERVICE_KEY,
    channel,
    consume_all,
    serve,
    tiny_generation_config,
    wait_until,
)

TEMPERATURE = 0.7
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return CheckpointStore(tmp_path_factory.mktemp("pool-checkpoints"))


@pytest.fixture(scope="module")
def served_v1(store, cache_dir):
    """Policy v1, written before the server starts, so the server serves it from the start."""
    manifest = store.write(POLICY, *policy_checkpoint_files(load_base_policy(TINY, cache_dir)))
    assert manifest.version == 1
    return manifest


@pytest.fixture(scope="module")
def server(broker, store, cache_dir, served_v1):
    config = tiny_generation_config(
        broker,
        store.root,
        cache_dir,
        http_port=-1,
        max_prompt_tokens=64,
        max_new_tokens_limit=32,
    )
    running = serve(GenerationService(config))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    with channel(server, SERVICE_KEY) as opened:
        yield generation_pb2_grpc.GenerationServiceStub(opened)


@pytest.fixture(scope="module")
def client(server):
    generation = GenerationClient(
        f"127.0.0.1:{server.port}", timeout=60, security=ClientSecurity(key=SERVICE_KEY)
    )
    yield generation
    generation.close()


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return load_tokenizer(cache_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["Tell me a joke.", "What is the capital of France?", "Say hi.", "Count to three."]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def params(n: int, seed: int = 100) -> list[decoding.Sampling]:
    return [
        decoding.Sampling(max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, seed=seed + row)
        for row in range(n)
    ]


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# -- the rollout API ----------------------------------------------------------------------------


def _ids_that_retokenise_differently(tokenizer) -> list[int]:
    ids = (
        tokenizer("He", add_special_tokens=False)["input_ids"]
        + tokenizer("llo", add_special_tokens=False)["input_ids"]
    )
    assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] != ids
    return ids


def test_prompt_token_ids_are_used_exactly_and_the_reply_carries_the_sampled_ids(
    stub, broker, tokenizer
):
    ids = _ids_that_retokenise_differently(tokenizer)
    reply = stub.Generate(
        generation_pb2.GenerateRequest(
            prompt_token_ids=ids,
            sampling=common_pb2.SamplingParams(max_new_tokens=5, temperature=1.0, seed=3),
            return_logprobs=True,
        )
    )
    assert reply.generation_id and reply.policy_version == 1
    assert len(reply.token_ids) == len(reply.logprobs) == reply.completion_tokens == 5
    assert reply.prompt_tokens == len(ids)
    events = consume_all(broker.bootstrap, bus.GENERATIONS, events_pb2.GenerationEvent)
    [event] = [r.message for r in events if r.message.generation_id == reply.generation_id]
    assert list(event.prompt_token_ids) == ids  # not the re-tokenised text's ids
    assert list(event.response_token_ids) == list(reply.token_ids)


def test_a_rollout_is_neither_signed_nor_published(stub, broker, tokenizer):
    marker = tokenizer("zebra quantum marmalade", add_special_tokens=False)["input_ids"]
    reply = stub.Generate(
        generation_pb2.GenerateRequest(
            prompt_token_ids=marker,
            sampling=common_pb2.SamplingParams(max_new_tokens=4, temperature=0.7, seed=1),
            return_logprobs=True,
            rollout=True,
        )
    )
    assert reply.generation_id == "" and len(reply.token_ids) == 4 and reply.policy_version == 1
    events = consume_all(broker.bootstrap, bus.GENERATIONS, events_pb2.GenerationEvent)
    assert events, "the module's other requests did publish"
    assert not [r for r in events if list(r.message.prompt_token_ids) == marker]


def _rollout_request(**overrides):
    fields = {
        "prompt_token_ids": [1, 2, 3],
        "sampling": common_pb2.SamplingParams(max_new_tokens=4, temperature=0.7),
        "return_logprobs": True,
        "rollout": True,
        **overrides,
    }
    return generation_pb2.GenerateRequest(**fields)


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (_rollout_request(prompt="text too"), "not both"),
        (_rollout_request(prompt_token_ids=[5] * 65), "65 tokens; the limit is 64"),
        (_rollout_request(prompt_token_ids=[1, 10**9]), "vocabulary"),
        (
            _rollout_request(
                sampling=common_pb2.SamplingParams(max_new_tokens=4, temperature=0.7, top_k=5)
            ),
            "top_k",
        ),
        (
            _rollout_request(
                sampling=common_pb2.SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9)
            ),
            "top_p",
        ),
        (
            _rollout_request(sampling=common_pb2.SamplingParams(max_new_tokens=4, temperature=0.0)),
            "temperature",
        ),
    ],
)
def test_bad_rollout_requests_are_invalid_argument(stub, request_, needle):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in caught.value.details()


# -- PoolSampler against the real server --------------------------------------------------------


def test_pool_logprobs_are_the_ones_the_trainer_recomputes(
    client, store, tokenizer, prompts, served_v1
):
    """Same weights on both sides: the pool's behaviour logprobs are the trainer's
    forward_policy logprobs (temperature-scaled, unfiltered), so every IS weight is ~1."""
    sampler = PoolSampler(client, lambda: 1, max_policy_lag=0)
    pooled = sampler.sample(prompts, params(len(prompts)))
    assert pooled.policy_versions == [1] * len(prompts) and pooled.max_lag == 0
    trainer_policy = policy_from_checkpoint(store.load(POLICY, 1, served_v1.sha256))
    old, behaviour, mask = _recompute(trainer_policy, tokenizer, prompts, pooled.completions)
    torch.testing.assert_close(old[mask], behaviour[mask], atol=1e-4, rtol=0)
    weights, stats = truncated_importance_weights(old, behaviour, mask, cap=2.0)
    assert stats["capped_frac"].item() == 0.0
    assert abs(stats["mean"].item() - 1.0) < 1e-3


def _recompute(policy, tokenizer, prompts, completions):
    """(trainer's logprobs, pool's logprobs, mask), [B, R] each."""
    responses = [c.token_ids for c in completions]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rollout = build_rollout(prompts, responses, [0.0] * len(prompts), pad, eos)
    with torch.no_grad():
        old, _, _ = forward_policy(
            policy,
            None,
            rollout.input_ids,
            rollout.attention_mask,
            rollout.prompt_width,
            TEMPERATURE,
        )
    behaviour = torch.zeros_like(old)
    for row, completion in enumerate(completions):
        behaviour[row, : len(completion.logprobs)] = torch.tensor(completion.logprobs)
    return old, behaviour, rollout.response_mask


def _perturbed(model, scale: float = 0.1, seed: int = 0):
    """`model` moved by seeded noise: at 0.1 the pool's samples become likelier under it for
    about a tenth of the tokens (far more noise and every sample becomes unlikely)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def test_importance_weights_are_capped_when_the_trainer_has_moved_on(
    client, cache_dir, tokenizer, prompts
):
    sampler = PoolSampler(client, lambda: 1, max_policy_lag=0)
    pooled = sampler.sample(prompts, params(len(prompts), seed=7))
    moved = _perturbed(load_base_policy(TINY, cache_dir))
    old, behaviour, mask = _recompute(moved, tokenizer, prompts, pooled.completions)
    raw = torch.exp(old - behaviour)[mask]
    assert (raw > 2.0).any() and (raw < 2.0).any()
    weights, stats = truncated_importance_weights(old, behaviour, mask, cap=2.0)
    assert weights[mask].max().item() <= 2.0 and (weights[~mask] == 0).all()
    assert stats["capped_frac"].item() == pytest.approx((raw > 2.0).float().mean().item())


def test_a_pool_behind_the_staleness_bound_is_refused_with_a_clear_error(client, prompts):
    # The trainer believes it published v3; with lag 1, the pool's v1 is too old.
    stale_before = _metric("rlhf_trainer_pool_stale_samples_total")
    sampler = PoolSampler(client, lambda: 3, max_policy_lag=1, max_wait=1.0, retry_interval=0.3)
    with pytest.raises(StaleRollouts, match="older than v2"):
        sampler.sample(prompts[:2], params(2))
    assert _metric("rlhf_trainer_pool_stale_samples_total") >= stale_before + 2 * 2


# -- PPO iterations with rollouts from the pool ---------------------------------------------------


class RecordingSampler(PoolSampler):
    """The real sampler, keeping the last batch it returned for the assertions."""

    last: PoolRollouts | None = None

    def sample(self, prompts, params):  # noqa: ANN001, ANN201
        self.last = super().sample(prompts, params)
        return self.last


def _learner(cache_dir, tokenizer, sampler, policy=None) -> PPOLearner:
    return PPOLearner(
        policy if policy is not None else load_base_policy(TINY, cache_dir),
        load_base_policy(TINY, cache_dir),
        tokenizer,
        PPOConfig(ppo_epochs=2, minibatch_size=2, temperature=TEMPERATURE, importance_cap=2.0),
        RolloutSettings(max_new_tokens=NEW_TOKENS, seed=5),
        sampler=sampler,
    )


def _score(_prompts: list[str], responses: list[str]) -> list[float]:
    return [len(r) / 50 for r in responses]


def test_ppo_trains_on_pool_rollouts_with_versions_recorded_and_weights_capped(
    client, cache_dir, tokenizer, prompts
):
    # The trainer believes it published v2 and has moved on from the v1 weights the pool
    # serves: every sample is v1 (lag 1, within the bound) and the IS weights must be capped.
    sampler = RecordingSampler(client, lambda: 2, max_policy_lag=1)
    moved = _perturbed(load_base_policy(TINY, cache_dir))
    learner = _learner(cache_dir, tokenizer, sampler, policy=moved)
    samples_before = _metric("rlhf_trainer_pool_samples_total")
    stats = [learner.iterate(prompts, _score) for _ in range(2)]
    assert learner.updates == 2
    assert sampler.last.policy_versions == [1] * len(prompts) and sampler.last.latest_version == 2
    assert _metric("rlhf_trainer_pool_samples_total") == samples_before + 2 * len(prompts)
    for step in stats:
        assert all(torch.isfinite(torch.tensor(v)) for v in step.values()), step
        assert step["rollout/policy_lag_max"] == 1.0
        assert 0.0 < step["policy/is_weight_mean"] <= 2.0
        assert 0.0 < step["policy/is_capped_frac"] < 1.0


def test_ppo_on_the_pools_own_weights_is_on_policy(client, store, cache_dir, tokenizer, prompts):
    sampler = RecordingSampler(client, lambda: 1, max_policy_lag=0)
    served = policy_from_checkpoint(store.load(POLICY, 1))
    stats = _learner(cache_dir, tokenizer, sampler, policy=served).iterate(prompts, _score)
    assert stats["rollout/policy_lag_max"] == 0.0 and stats["policy/is_capped_frac"] == 0.0
    assert stats["policy/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert stats["objective/kl"] > -0.05  # the KL warning's bound: same distributions


def test_a_stale_pool_fails_the_iteration_before_any_update(client, cache_dir, tokenizer, prompts):
    sampler = PoolSampler(client, lambda: 3, max_policy_lag=1, max_wait=0.5, retry_interval=0.2)
    learner = _learner(cache_dir, tokenizer, sampler)
    before = [p.detach().clone() for p in learner.policy.parameters()]
    with pytest.raises(StaleRollouts) as caught:
        learner.iterate(prompts, _score)
    # The training loop puts a batch back on RewardUnavailable instead of dropping it.
    assert isinstance(caught.value, RewardUnavailable)
    assert learner.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.policy.parameters(), strict=True))


def test_stale_samples_are_asked_again_until_the_pool_has_reloaded(
    client, broker, store, cache_dir, prompts, stub
):
    """The trainer has published v2 but the pool still serves v1: with lag 0 the sampler keeps
    asking until the pool has hot-reloaded v2, and the batch is all v2."""
    sampler = PoolSampler(client, lambda: 2, max_policy_lag=0, max_wait=60.0, retry_interval=0.2)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(sampler.sample(prompts, params(4))))
    stale_before = _metric("rlhf_trainer_pool_stale_samples_total")
    worker.start()
    assert wait_until(lambda: _metric("rlhf_trainer_pool_stale_samples_total") > stale_before)
    moved = load_base_policy(TINY, cache_dir, seed=1)
    manifest = store.write(POLICY, *policy_checkpoint_files(moved))
    assert manifest.version == 2
    event = events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_POLICY,
        version=manifest.version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
    )
    with bus.Publisher(broker.bootstrap, client_id="test-pool") as publisher:
        publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
    worker.join(timeout=60)
    assert not worker.is_alive() and result
    assert result[0].policy_versions == [2, 2, 2, 2] and result[0].latest_version == 2
    assert stub.GetPolicyInfo(generation_pb2.GetPolicyInfoRequest()).version == 2

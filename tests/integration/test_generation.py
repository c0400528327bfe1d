"""The generation service on a real broker and a real gRPC server over loopback."""

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from rlhf import bus
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.ids import GenerationIdSigner, partition_key, prompt_digest
from rlhf.models import TINY, load_base_policy, policy_checkpoint_files
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc
from services.generation.main import GenerationService
from tests.conftest import (
    API_KEY,
    ID_KEY,
    channel,
    consume_all,
    scrape,
    serve,
    tiny_generation_config,
    wait_until,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return CheckpointStore(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def server(broker, store, cache_dir):
    config = tiny_generation_config(
        broker,
        store.root,
        cache_dir,
        max_prompt_tokens=64,
        max_new_tokens_limit=32,
        default_max_new_tokens=8,
    )
    running = serve(GenerationService(config))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    with channel(server, API_KEY) as opened:
        yield generation_pb2_grpc.GenerationServiceStub(opened)


def _request(prompt="Hello there", seed=7, max_new_tokens=8, **sampling):
    return generation_pb2.GenerateRequest(
        prompt=prompt,
        sampling=common_pb2.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, **sampling
        ),
        return_logprobs=True,
    )


def test_generate_returns_text_counts_version_and_signed_id(stub, broker):
    reply = stub.Generate(_request())
    assert reply.completion_tokens == 8 == len(reply.logprobs)
    assert reply.prompt_tokens > 0 and reply.text
    assert reply.policy_version == 0 and reply.finish_reason == "length"
    claims = GenerationIdSigner(ID_KEY.encode()).verify(reply.generation_id)
    assert claims.policy_version == 0
    events = consume_all(broker.bootstrap, bus.GENERATIONS, events_pb2.GenerationEvent)
    [event] = [r for r in events if r.message.generation_id == reply.generation_id]
    # Keyed by the prompt digest: answers to one prompt and the feedback on them share a partition.
    assert event.key == partition_key(reply.generation_id) == claims.prompt_hash
    assert event.message.response == reply.text
    assert len(event.message.response_token_ids) == 8
    assert list(event.message.response_logprobs) == pytest.approx(list(reply.logprobs))
    assert event.message.sampling.seed == 7
    # The id is bound to its prompt, so a ranking can be proven to answer one prompt.
    assert claims.prompt_hash == prompt_digest(event.message.prompt)


def test_seed_makes_output_reproducible(stub):
    first, second = stub.Generate(_request(seed=11)), stub.Generate(_request(seed=11))
    assert first.text == second.text and first.generation_id != second.generation_id
    assert stub.Generate(_request(seed=12)).text != first.text


def test_chat_messages_go_through_the_chat_template(stub, broker):
    reply = stub.Generate(
        generation_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role="user", content="Hi!")],
            sampling=common_pb2.SamplingParams(max_new_tokens=4, seed=1),
        )
    )
    events = consume_all(broker.bootstrap, bus.GENERATIONS, events_pb2.GenerationEvent)
    [event] = [r.message for r in events if r.message.generation_id == reply.generation_id]
    assert event.prompt.startswith("<|im_start|>") and "Hi!" in event.prompt
    assert event.prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (_request(prompt=""), "empty"),
        (_request(prompt="   "), "empty"),
        (_request(max_new_tokens=33), "max_new_tokens"),
        (_request(prompt="word " * 200), "tokens"),
        (_request(top_p=1.5), "top_p"),
        (
            generation_pb2.GenerateRequest(
                prompt="x", messages=[common_pb2.ChatMessage(role="user", content="y")]
            ),
            "not both",
        ),
        (
            generation_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role="robot", content="y")]
            ),
            "role",
        ),
    ],
)
def test_bad_requests_are_invalid_argument(stub, request_, needle):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in caught.value.details()


def test_stop_sequence_cuts_the_text(stub):
    free = stub.Generate(_request(seed=5, max_new_tokens=16))
    stop = free.text.strip()[3:5]
    assert stop, "the sample is too short to pick a stop sequence from"
    cut = stub.Generate(_request(seed=5, max_new_tokens=16, stop=[stop]))
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert free.text.startswith(cut.text)


def test_health_reflection_and_metrics(server, stub):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "rlhf.v1.GenerationService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "rlhf.v1.GenerationService" in services
    stub.Generate(_request())
    text = scrape(server)
    assert 'rlhf_grpc_requests_total{code="OK",method="Generate",service="generation"}' in text
    assert 'rlhf_served_version{kind="policy"}' in text


def _publish_checkpoint(broker, manifest):
    event = events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_POLICY,
        version=manifest.version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
    )
    with bus.Publisher(broker.bootstrap, client_id="test") as publisher:
        publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)


def test_hot_reload_then_tampered_checkpoint_is_refused(stub, broker, store, cache_dir, server):
    before = stub.Generate(_request(seed=3))
    model = load_base_policy(TINY, cache_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    manifest = store.write(POLICY, *policy_checkpoint_files(model))
    _publish_checkpoint(broker, manifest)
    info = generation_pb2.GetPolicyInfoRequest()
    assert wait_until(lambda: stub.GetPolicyInfo(info).version == manifest.version)
    assert stub.GetPolicyInfo(info).manifest_sha256 == manifest.sha256
    after = stub.Generate(_request(seed=3))
    assert after.policy_version == manifest.version
    assert after.text != before.text

    tampered = store.write(POLICY, *policy_checkpoint_files(model))
    weights = store.root / tampered.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    refused_before = _refused(server)
    _publish_checkpoint(broker, tampered)
    assert wait_until(lambda: _refused(server) == refused_before + 1)
    assert stub.GetPolicyInfo(info).version == manifest.version
    assert stub.Generate(_request(seed=3)).text == after.text


def _refused(server) -> float:
    """Refused policy reloads so far (other modules' events on the shared topic count too)."""
    prefix = 'rlhf_checkpoint_reloads_total{kind="policy",outcome="refused"} '
    lines = [line for line in scrape(server).splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0

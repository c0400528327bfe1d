"""How the platform's own clients read a refusal from a real gRPC server over loopback: "not now"
(the training loop puts its batch back and retries) or "never" (retrying would fail the same
way)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from rlhf import decoding
from rlhf.clients import (
    GenerationClient,
    RewardClient,
    RewardUnavailable,
    RolloutRejected,
    RolloutsUnavailable,
)
from rlhf.v1 import generation_pb2_grpc, reward_pb2_grpc


class Refusing(
    generation_pb2_grpc.GenerationServiceServicer, reward_pb2_grpc.RewardServiceServicer
):
    """Answers every Generate and Score with `code`."""

    code = grpc.StatusCode.OK

    def Generate(self, request, context):  # noqa: ANN001, ANN201, N802
        context.abort(self.code, f"refused with {self.code.name}")

    def Score(self, request, context):  # noqa: ANN001, ANN201, N802
        context.abort(self.code, f"refused with {self.code.name}")


@pytest.fixture(scope="module")
def refusing() -> Iterator[tuple[Refusing, str]]:
    servicer = Refusing()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


NOT_NOW = [
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    # Under overload gRPC's core drops calls it queued but the service never read with
    # CANCELLED; the platform's servers cancel calls whose request did not arrive in time.
    grpc.StatusCode.CANCELLED,
]
NEVER = [
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
]


def _rollouts(address: str) -> None:
    client = GenerationClient(address, timeout=10)
    try:
        client.rollouts([[1, 2, 3], [4, 5]], [decoding.Sampling(max_new_tokens=4)] * 2)
    finally:
        client.close()


@pytest.mark.parametrize("code", NOT_NOW, ids=lambda c: c.name)
def test_a_pool_refusing_for_now_makes_the_batch_wait_not_fail(refusing, code):
    servicer, address = refusing
    servicer.code = code
    with pytest.raises(RolloutsUnavailable, match=code.name) as caught:
        _rollouts(address)
    # The training loop puts a batch back on RewardUnavailable instead of dropping it.
    assert isinstance(caught.value, RewardUnavailable)


@pytest.mark.parametrize("code", NEVER, ids=lambda c: c.name)
def test_a_pool_rejecting_the_request_is_not_retried(refusing, code):
    servicer, address = refusing
    servicer.code = code
    with pytest.raises(RolloutRejected, match=code.name):
        _rollouts(address)


@pytest.mark.parametrize("code", NOT_NOW, ids=lambda c: c.name)
def test_a_reward_service_refusing_for_now_makes_the_batch_wait(refusing, code):
    servicer, address = refusing
    servicer.code = code
    client = RewardClient(address, timeout=10)
    try:
        with pytest.raises(RewardUnavailable, match=code.name):
            client(["a prompt"], ["an answer"])
    finally:
        client.close()

"""Who may call what, against real services over loopback: the trainer's control plane needs an
operator, Score a service, Generate an app (rollouts a service), /metrics a reader; ids are the
asking tenant's and canonical; feedback is rate limited per tenant; mutual TLS on every port;
undecodable requests are the client's fault."""

import dataclasses
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf.auth import ClientSecurity, dial
from rlhf.clients import RewardClient, RewardUnavailable
from rlhf.ids import GenerationIdSigner
from rlhf.models import TINY
from rlhf.scrape import scrape
from rlhf.server import server_for
from rlhf.v1 import (
    common_pb2,
    events_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.feedback.config import FeedbackConfig
from services.feedback.main import FeedbackService
from services.generation.main import GenerationService
from services.reward.config import RewardConfig
from services.reward.main import RewardService
from services.trainer.main import build
from tests.conftest import (
    API_KEY,
    AUTH,
    ID_KEY,
    KEYS_ENV,
    OPERATOR_KEY,
    READER_KEY,
    SERVICE_KEY,
    TENANT,
    channel,
    serve,
    tiny_generation_config,
    trainer_config,
)

OTHER_KEY = "other-tenants-key-0123456789"
CODE = grpc.StatusCode


@pytest.fixture(scope="module")
def common(broker, cache_dir, tmp_path_factory):
    return {
        "kafka_bootstrap": broker.bootstrap,
        "checkpoint_dir": tmp_path_factory.mktemp("security"),
        "cache_dir": cache_dir,
    }


@pytest.fixture(scope="module")
def generation(broker, common, cache_dir):
    running = serve(
        GenerationService(tiny_generation_config(broker, common["checkpoint_dir"], cache_dir))
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reward(common):
    running = serve(RewardService(RewardConfig(**common, reward_model=TINY, drift_sample=0.0)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def trainer(common):
    config = trainer_config(
        common,
        RLHF_TRAINER_STAGE="reward",
        RLHF_REWARD_MODEL=TINY,
        RLHF_POLICY_MODEL=TINY,
        RLHF_REWARD_TRAINER_GROUP=f"security-{uuid.uuid4().hex[:8]}",
        RLHF_REWARD_ROUND_EXAMPLES=10_000,
        RLHF_KAFKA_MAX_POLL_INTERVAL_MS=4000,
    )
    running = serve(build(config))
    yield running
    running.stop()


def _feedback_service(common, **limits):
    config = FeedbackConfig(
        **common,
        generation_id_key=ID_KEY,
        api_keys=(f"{TENANT}={API_KEY}", f"other={OTHER_KEY}"),
        **limits,
    )
    return serve(FeedbackService(config))


@pytest.fixture(scope="module")
def feedback(common):
    running = _feedback_service(common)
    yield running
    running.stop()


@pytest.fixture
def limited_feedback(common):
    """One submission every two seconds per tenant, after a burst of five."""
    running = _feedback_service(common, rate_per_tenant=0.5, burst_per_tenant=5)
    yield running
    running.stop()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_the_control_plane_needs_an_operator(trainer):
    """An unauthenticated Rollback is UNAUTHENTICATED; a reader may look but not steer; an
    app's key is no key here."""
    request = trainer_pb2.RollbackRequest(version=1, pause=True)
    for key in ("", API_KEY, "a-key-nobody-was-ever-given-0"):
        with channel(trainer, key) as opened:
            stub = trainer_pb2_grpc.TrainerServiceStub(opened)
            assert _code(lambda s=stub: s.Rollback(request, timeout=10)) == CODE.UNAUTHENTICATED
            assert _code(lambda s=stub: s.GetStatus(trainer_pb2.GetStatusRequest())) == (
                CODE.UNAUTHENTICATED
            )
    with channel(trainer, READER_KEY) as opened:
        stub = trainer_pb2_grpc.TrainerServiceStub(opened)
        assert stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=10).stage == "reward"
        stub.ListCheckpoints(trainer_pb2.ListCheckpointsRequest(), timeout=10)
        for call in (
            lambda: stub.Rollback(request, timeout=10),
            lambda: stub.Checkpoint(trainer_pb2.CheckpointRequest(), timeout=10),
            lambda: stub.Pause(trainer_pb2.PauseRequest(), timeout=10),
        ):
            assert _code(call) == CODE.PERMISSION_DENIED
    with channel(trainer, OPERATOR_KEY) as opened:
        stub = trainer_pb2_grpc.TrainerServiceStub(opened)
        assert stub.Pause(trainer_pb2.PauseRequest(), timeout=10).paused
        assert not stub.Resume(trainer_pb2.ResumeRequest(), timeout=10).paused


def test_the_reward_model_is_no_open_oracle(reward):
    score = reward_pb2.ScoreRequest(pairs=[reward_pb2.ScoredPair(prompt="Hi", response="Hello")])
    for key, code in (("", CODE.UNAUTHENTICATED), (READER_KEY, CODE.PERMISSION_DENIED)):
        with channel(reward, key) as opened:
            stub = reward_pb2_grpc.RewardServiceStub(opened)
            assert _code(lambda s=stub: s.Score(score, timeout=10)) == code
    with channel(reward, READER_KEY) as opened:
        info = reward_pb2_grpc.RewardServiceStub(opened).GetModelInfo(
            reward_pb2.GetModelInfoRequest(), timeout=10
        )
        assert info.version == 0
    # The trainer's client, with its service key (RLHF_CLIENT_KEY), scores.
    client = RewardClient(f"127.0.0.1:{reward.port}", security=ClientSecurity(key=SERVICE_KEY))
    try:
        assert len(client(["Hi"], ["Hello"]).values) == 1
    finally:
        client.close()
    anonymous = RewardClient(f"127.0.0.1:{reward.port}")
    try:
        with pytest.raises(RewardUnavailable, match="UNAUTHENTICATED"):
            anonymous(["Hi"], ["Hello"])
    finally:
        anonymous.close()


def _generate(**fields) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(max_new_tokens=3, temperature=1.0, seed=1), **fields
    )


def test_generate_needs_an_app_key_and_rollouts_a_service_key(generation):
    prompt = _generate(prompt="Hello")
    rollout = _generate(prompt_token_ids=[1, 2, 3], rollout=True, return_logprobs=True)
    for key, code in (("", CODE.UNAUTHENTICATED), (READER_KEY, CODE.PERMISSION_DENIED)):
        with channel(generation, key) as opened:
            stub = generation_pb2_grpc.GenerationServiceStub(opened)
            assert _code(lambda s=stub: s.Generate(prompt, timeout=30)) == code
    with channel(generation, API_KEY) as opened:
        stub = generation_pb2_grpc.GenerationServiceStub(opened)
        answer = stub.Generate(prompt, timeout=60)
        # Unsigned, unpublished samples are the trainer's alone.
        assert _code(lambda: stub.Generate(rollout, timeout=30)) == CODE.PERMISSION_DENIED
    claims = GenerationIdSigner(ID_KEY.encode()).verify(answer.generation_id)
    assert claims.tenant == TENANT and claims.prompt_hash
    with channel(generation, SERVICE_KEY) as opened:
        stub = generation_pb2_grpc.GenerationServiceStub(opened)
        sampled = stub.Generate(rollout, timeout=60)
        assert sampled.generation_id == "" and len(sampled.token_ids) == 3
    with channel(generation, READER_KEY) as opened:
        info = generation_pb2_grpc.GenerationServiceStub(opened).GetPolicyInfo(
            generation_pb2.GetPolicyInfoRequest(), timeout=10
        )
        assert info.model == TINY


def test_an_open_generation_service_binds_no_tenant_and_still_guards_rollouts(
    broker, common, cache_dir
):
    config = tiny_generation_config(
        broker, common["checkpoint_dir"], cache_dir, api_keys=(), open_access=True
    )
    running = serve(GenerationService(config))
    try:
        with channel(running) as opened:
            stub = generation_pb2_grpc.GenerationServiceStub(opened)
            answer = stub.Generate(_generate(prompt="Hello"), timeout=60)
            rollout = _generate(prompt_token_ids=[1, 2], rollout=True, return_logprobs=True)
            assert _code(lambda: stub.Generate(rollout, timeout=30)) == CODE.PERMISSION_DENIED
        assert GenerationIdSigner(ID_KEY.encode()).verify(answer.generation_id).tenant == ""
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("server", "method", "key"),
    [
        ("generation", "/rlhf.v1.GenerationService/Generate", API_KEY),
        ("reward", "/rlhf.v1.RewardService/Score", SERVICE_KEY),
        ("trainer", "/rlhf.v1.TrainerService/GetStatus", READER_KEY),
        ("feedback", "/rlhf.v1.FeedbackService/SubmitFeedback", API_KEY),
    ],
)
def test_undecodable_requests_are_invalid_argument(request, server, method, key):
    running = request.getfixturevalue(server)
    with channel(running, key) as opened:
        call = opened.unary_unary(method)  # raw bytes in, raw bytes out
        assert _code(lambda: call(b"\xff\xff\xff\xff", timeout=10)) == CODE.INVALID_ARGUMENT


def test_metrics_need_a_reader_key(reward):
    with pytest.raises(urllib.error.HTTPError) as caught:
        scrape(reward.metrics_port)
    assert caught.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as caught:
        scrape(reward.metrics_port, security=ClientSecurity(key="a-key-nobody-was-given-00"))
    assert caught.value.code == 401
    for key in (READER_KEY, OPERATOR_KEY, SERVICE_KEY):
        assert "rlhf_grpc_requests_total" in scrape(
            reward.metrics_port, security=ClientSecurity(key=key)
        )


def _thumb(
    generation_id: str, key: str | None = None, **fields
) -> feedback_pb2.SubmitFeedbackRequest:
    return feedback_pb2.SubmitFeedbackRequest(
        feedback=events_pb2.Feedback(
            generation_id=generation_id,
            idempotency_key=key or uuid.uuid4().hex,
            thumb=events_pb2.THUMB_UP,
            **fields,
        )
    )


def test_feedback_only_from_the_owner_once_per_user_on_canonical_ids(generation, feedback):
    with channel(generation, API_KEY) as opened:
        answer = generation_pb2_grpc.GenerationServiceStub(opened).Generate(
            _generate(prompt="Rate me"), timeout=60
        )
    gid = answer.generation_id
    with channel(feedback) as opened:
        stub = feedback_pb2_grpc.FeedbackServiceStub(opened)
        other = (("authorization", f"Bearer {OTHER_KEY}"),)
        # A cross-tenant thumb: refused.
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitFeedback(_thumb(gid), metadata=other, timeout=10)
        assert caught.value.code() == CODE.PERMISSION_DENIED
        assert "another tenant" in caught.value.details()
        # The same id spelt otherwise (padding, junk): refused, not a second generation.
        prefix, kid, payload, signature = gid.split(".")
        variants = (
            gid + "=",
            f"{prefix}.{kid}.{payload}==.{signature}",
            f"{prefix}.{kid}.{payload[:3]}*{payload[3:]}.{signature}",
        )
        for variant in variants:
            with pytest.raises(grpc.RpcError) as caught:
                stub.SubmitFeedback(_thumb(variant), metadata=AUTH, timeout=10)
            assert caught.value.code() == CODE.INVALID_ARGUMENT
        # One counted thumb per (generation, tenant, user), whatever the idempotency key.
        first = stub.SubmitFeedback(_thumb(gid, user_key="user-7"), metadata=AUTH, timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitFeedback(_thumb(gid, user_key="user-7"), metadata=AUTH, timeout=10)
        assert caught.value.code() == CODE.ALREADY_EXISTS
        other_user = stub.SubmitFeedback(_thumb(gid, user_key="user-8"), metadata=AUTH, timeout=10)
        assert first.event_id != other_user.event_id


def test_each_tenant_is_rate_limited_on_its_own(generation, limited_feedback):
    with channel(generation, API_KEY) as opened:
        gid = (
            generation_pb2_grpc.GenerationServiceStub(opened)
            .Generate(_generate(prompt="Again"), timeout=60)
            .generation_id
        )
    with channel(limited_feedback) as opened:
        stub = feedback_pb2_grpc.FeedbackServiceStub(opened)
        codes = []
        for _ in range(12):
            try:
                stub.SubmitFeedback(_thumb(gid), metadata=AUTH, timeout=10)
                codes.append(CODE.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert CODE.RESOURCE_EXHAUSTED in codes and codes[0] == CODE.OK
        # Another tenant still has its own budget.
        reply = stub.StreamFeedback(
            iter([feedback_pb2.StreamFeedbackRequest(items=[_thumb("junk").feedback])]),
            metadata=(("authorization", f"Bearer {OTHER_KEY}"),),
            timeout=10,
        )
        assert reply.results[0].reason == "malformed_id"  # refused for its id, not its rate


def test_stream_results_never_echo_a_whole_runaway_key(feedback):
    with channel(feedback) as opened:
        stub = feedback_pb2_grpc.FeedbackServiceStub(opened)
        item = events_pb2.Feedback(generation_id="junk", idempotency_key="k" * 1_000_000)
        reply = stub.StreamFeedback(
            iter([feedback_pb2.StreamFeedbackRequest(items=[item])]),
            metadata=(("authorization", f"Bearer {OTHER_KEY}"),),
            timeout=10,
        )
    assert reply.failed == 1 and reply.results[0].idempotency_key == "k" * 128


def test_mutual_tls_on_every_port(common, pki):
    """A reward service serving TLS that requires client certificates of its CA: the trainer's
    client with the service certificate scores; a plaintext caller, a caller without a
    certificate and a caller with another CA's certificate get nothing; /metrics is TLS too;
    probes have a plaintext health port."""
    environ = {
        **KEYS_ENV,
        "RLHF_TLS_CERT_FILE": str(pki.cert),
        "RLHF_TLS_KEY_FILE": str(pki.key),
        "RLHF_TLS_CA_FILE": str(pki.ca),
        "RLHF_TLS_CLIENT_AUTH": "true",
        "RLHF_HEALTH_PORT": "0",
        "RLHF_GRPC_HOST": "127.0.0.1",
    }
    from rlhf.config import load_config

    config = dataclasses.replace(
        load_config(RewardConfig, environ), **common, reward_model=TINY, drift_sample=0.0
    )
    running = server_for(RewardService(config), config, port=0).start()
    address = f"127.0.0.1:{running.port}"
    trusted = ClientSecurity(SERVICE_KEY, str(pki.ca), str(pki.cert), str(pki.key))
    try:
        client = RewardClient(address, timeout=10, security=trusted)
        try:
            assert len(client(["Hi"], ["Hello"]).values) == 1
        finally:
            client.close()
        for security in (
            ClientSecurity(SERVICE_KEY),  # plaintext
            ClientSecurity(SERVICE_KEY, str(pki.ca)),  # no client certificate
            ClientSecurity(SERVICE_KEY, str(pki.ca), str(pki.stranger_cert), str(pki.stranger_key)),
        ):
            stranger = RewardClient(address, timeout=5, security=security)
            try:
                with pytest.raises(RewardUnavailable, match="UNAVAILABLE"):
                    stranger(["Hi"], ["Hello"])
            finally:
                stranger.close()
        metrics = scrape(
            running.metrics_port, security=dataclasses.replace(trusted, key=READER_KEY)
        )
        assert "rlhf_grpc_requests_total" in metrics
        with pytest.raises(OSError):  # TLS, and without a client certificate: no handshake
            scrape(running.metrics_port, security=ClientSecurity(READER_KEY, str(pki.ca)))
        with dial(f"127.0.0.1:{running.health_port}") as plain:
            reply = health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop()

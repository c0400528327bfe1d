"""Production serving: streaming, dynamic batching, overload, hot swap under load, and the
TGI-compatible HTTP API driven by the real `text-generation` client (sync and async)."""

import asyncio
import gc
import json
import socket
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
import torch
from text_generation import AsyncClient, Client
from text_generation.errors import ValidationError

from rlhf import bus
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.models import TINY, load_base_policy, policy_checkpoint_files, serving_dtype
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc
from services.generation.main import GenerationService
from tests.conftest import API_KEY, channel, scrape, serve, tiny_generation_config, wait_until


def _config(broker, store, cache_dir, **overrides):
    values = {"max_new_tokens_limit": 64, "batch_wait_ms": 20.0}
    return tiny_generation_config(broker, store.root, cache_dir, **{**values, **overrides})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return CheckpointStore(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def service(broker, store, cache_dir):
    generation = GenerationService(_config(broker, store, cache_dir))
    running = serve(generation)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(service):
    with channel(service, API_KEY) as opened:
        yield generation_pb2_grpc.GenerationServiceStub(opened)


@pytest.fixture(scope="module")
def base_url(service):
    return f"http://127.0.0.1:{service.service.http.port}"


HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _request(prompt="Tell me a story", seed=1, max_new_tokens=12, **extra):
    return generation_pb2.GenerateRequest(
        prompt=prompt,
        sampling=common_pb2.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, **extra
        ),
        return_logprobs=True,
    )


def test_stream_sends_tokens_then_the_final_answer(stub):
    items = list(stub.GenerateStream(_request(seed=4)))
    tokens = [i.token for i in items if i.WhichOneof("item") == "token"]
    [final] = [i.final for i in items if i.WhichOneof("item") == "final"]
    assert items[-1].WhichOneof("item") == "final"
    assert len(tokens) == final.completion_tokens == 12
    assert "".join(t.text for t in tokens) == final.text
    assert [t.logprob for t in tokens] == pytest.approx(list(final.logprobs))
    assert final.generation_id and final.text == stub.Generate(_request(seed=4)).text


def test_stream_refuses_bad_input_with_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GenerateStream(_request(prompt="")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_requests_share_batches_and_keep_seeded_results(stub, service):
    seeds = list(range(20, 28))
    alone = {seed: stub.Generate(_request(seed=seed)).text for seed in seeds}
    before = _batch_stats(scrape(service))
    with ThreadPoolExecutor(len(seeds)) as pool:
        replies = pool.map(lambda s: stub.Generate(_request(seed=s)).text, seeds)
        together = dict(zip(seeds, replies, strict=True))
    after = _batch_stats(scrape(service))
    assert together == alone  # batching never changes a seeded answer
    steps, rows = after[0] - before[0], after[1] - before[1]
    # 8 requests of 12 tokens each: rows summed over decode steps, at most 11 steps each (the
    # first token comes from the prefill); more than one row per step on average means shared.
    assert 0 < rows <= len(seeds) * 11 and rows / steps > 1, "requests were not batched"


def _batch_stats(metrics: str) -> tuple[float, float]:
    values = {}
    for line in metrics.splitlines():
        if line.startswith(("rlhf_generation_batch_size_count", "rlhf_generation_batch_size_sum")):
            name, value = line.split()
            values[name] = float(value)
    return values["rlhf_generation_batch_size_count"], values["rlhf_generation_batch_size_sum"]


def test_serving_metrics_are_exported(stub, service):
    stub.Generate(_request())
    metrics = scrape(service)
    for name in (
        "rlhf_generation_time_to_first_token_seconds_count",
        "rlhf_generation_queue_depth",
        "rlhf_generation_tokens_total",
        "rlhf_generation_request_seconds_count",
        'rlhf_served_version{kind="policy"}',
    ):
        assert name in metrics


def test_full_queue_is_resource_exhausted(broker, store, cache_dir):
    config = _config(broker, store, cache_dir, max_concurrent_requests=1, max_batch=1)
    running = serve(GenerationService(config))
    try:
        with channel(running, API_KEY) as opened:
            stub = generation_pb2_grpc.GenerationServiceStub(opened)

            def call(seed):
                try:
                    stub.Generate(_request(seed=seed, max_new_tokens=48))
                    return grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    return exc.code()

            with ThreadPoolExecutor(12) as pool:
                codes = list(pool.map(call, range(12)))
    finally:
        running.stop()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _publish_perturbed(broker, store, cache_dir, scale):
    model = load_base_policy(TINY, cache_dir)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    manifest = store.write(POLICY, *policy_checkpoint_files(model))
    event = events_pb2.CheckpointEvent(
        kind=events_pb2.CHECKPOINT_KIND_POLICY,
        version=manifest.version,
        path=manifest.path,
        manifest_sha256=manifest.sha256,
    )
    with bus.Publisher(broker.bootstrap, client_id="test") as publisher:
        publisher.publish(bus.POLICY_CHECKPOINTS, POLICY, event)
    return manifest


def test_swaps_under_concurrent_load_fail_no_request(stub, broker, store, cache_dir):
    stop, failures, versions = threading.Event(), [], []

    def client(index):
        while not stop.is_set():
            try:
                reply = stub.Generate(_request(seed=index, max_new_tokens=8))
                versions.append(reply.policy_version)
            except grpc.RpcError as exc:
                failures.append(exc.code())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        info = generation_pb2.GetPolicyInfoRequest()
        for scale in (0.3, 0.6):
            manifest = _publish_perturbed(broker, store, cache_dir, scale)
            assert wait_until(lambda m=manifest: stub.GetPolicyInfo(info).version == m.version)
        count_at_last_swap = len(versions)
        assert wait_until(lambda: len(versions) > count_at_last_swap + 6)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert len(set(versions)) >= 2, "load did not span a swap"
    assert versions[-1] == manifest.version


def test_retired_versions_are_freed_by_reference_counting_alone(broker, store, cache_dir):
    """A service process freezes what start-up built (`rlhf.server.settle_heap`): the collector
    never frees it, so the version served at start must go by reference counting once swapped
    out (after two swaps: the retired version's memory is the next read's spare, and its model
    objects may be the loader's to build the next version in)."""
    running = serve(GenerationService(_config(broker, store, cache_dir)))
    info = generation_pb2.GetPolicyInfoRequest()
    try:
        slot = running.service.core.backend._slot  # what the backend serves (no public handle)
        initial = weakref.ref(slot.current().model)
        with channel(running, API_KEY) as opened:
            stub = generation_pb2_grpc.GenerationServiceStub(opened)
            stub.Generate(_request())
            gc.collect()
            gc.disable()
            for scale in (0.3, 0.6):
                manifest = _publish_perturbed(broker, store, cache_dir, scale)
                assert wait_until(lambda m=manifest: stub.GetPolicyInfo(info).version == m.version)
                stub.Generate(_request())
            assert initial() is None
    finally:
        gc.enable()
        running.stop()


# -- TGI-compatible HTTP API, driven by the official client -------------------------------------


def test_tgi_client_generate_with_details(base_url):
    client = Client(base_url, headers=HEADERS)
    reply = client.generate("Once upon a time", max_new_tokens=6, do_sample=True, seed=3)
    assert reply.details.generated_tokens == 6 == len(reply.details.tokens)
    assert reply.details.finish_reason.value == "length"
    # as in TGI, generated_text leaves out special tokens (a random tiny model samples some)
    assert reply.generated_text == "".join(t.text for t in reply.details.tokens if not t.special)
    again = client.generate("Once upon a time", max_new_tokens=6, do_sample=True, seed=3)
    assert again.generated_text == reply.generated_text


def test_tgi_client_stream(base_url):
    chunks = list(
        Client(base_url, headers=HEADERS).generate_stream(
            "Hello", max_new_tokens=5, seed=2, top_k=50
        )
    )
    assert len(chunks) == 5
    assert all(c.details is None for c in chunks[:-1])
    assert chunks[-1].details.generated_tokens == 5
    assert chunks[-1].generated_text == "".join(c.token.text for c in chunks if not c.token.special)


def test_tgi_async_client_and_errors(base_url):
    async def scenario():
        client = AsyncClient(base_url, headers=HEADERS)
        reply = await client.generate("Hi", max_new_tokens=4, do_sample=True, seed=9)
        streamed = [c async for c in client.generate_stream("Hi", max_new_tokens=4, seed=9)]
        with pytest.raises(ValidationError, match="max_new_tokens"):
            await client.generate("Hi", max_new_tokens=1000)
        return reply, streamed

    reply, streamed = asyncio.run(scenario())
    assert reply.details.generated_tokens == 4 == len(streamed)
    with pytest.raises(ValidationError, match="empty"):
        Client(base_url, headers=HEADERS).generate("   ")
    with pytest.raises(ValidationError, match="repetition_penalty"):
        Client(base_url, headers=HEADERS).generate("Hi", repetition_penalty=1.3)


def test_tgi_routes_info_health_and_generation_id(base_url):
    assert requests.get(f"{base_url}/health", timeout=5).status_code == 200
    assert requests.get(f"{base_url}/info", timeout=5).status_code == 401
    info = requests.get(f"{base_url}/info", headers=HEADERS, timeout=5).json()
    assert info["max_input_tokens"] > 0 and info["backend"] == "local"
    assert info["model_dtype"] == str(serving_dtype("auto")).removeprefix("torch.")
    reply = requests.post(
        f"{base_url}/generate",
        json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}},
        headers=HEADERS,
        timeout=30,
    )
    assert reply.status_code == 200
    assert reply.json()["generation_id"] == reply.headers["x-generation-id"]
    bad = requests.post(f"{base_url}/generate", data=b"not json", headers=HEADERS, timeout=5)
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"


def test_tgi_backend_serves_grpc_through_a_tgi_server(broker, store, cache_dir, base_url):
    """The `tgi` backend, pointed at another generation service's TGI-compatible API (TGI
    cannot run here; that one open to callers without a key, as a TGI server is): gRPC in, the
    text-generation client out, same answer as the local backend."""
    stand_in = serve(GenerationService(_config(broker, store, cache_dir, open_access=True)))
    tgi_url = f"http://127.0.0.1:{stand_in.service.http.port}"
    config = _config(broker, store, cache_dir, backend="tgi", tgi_url=tgi_url)
    running = serve(GenerationService(config))
    try:
        with channel(running, API_KEY) as opened:
            stub = generation_pb2_grpc.GenerationServiceStub(opened)
            via_tgi = stub.Generate(_request(seed=8, max_new_tokens=6))
            streamed = list(stub.GenerateStream(_request(seed=8, max_new_tokens=6)))
            info = stub.GetPolicyInfo(generation_pb2.GetPolicyInfoRequest())
    finally:
        running.stop()
        stand_in.stop()
    assert info.backend == "tgi"
    assert via_tgi.completion_tokens == 6 and len(via_tgi.logprobs) == 6
    assert streamed[-1].final.text == via_tgi.text
    direct = Client(base_url, headers=HEADERS).generate(
        "Tell me a story", max_new_tokens=6, seed=8, temperature=1.0
    )
    assert via_tgi.text == direct.generated_text


# -- the HTTP API cannot be frozen, and always answers with a status ---------------------------


@pytest.fixture(scope="module")
def strict_http(broker, store, cache_dir):
    """A generation service with a short read timeout and two HTTP connections at most."""
    config = _config(broker, store, cache_dir, read_timeout_seconds=1.0, http_max_connections=2)
    running = serve(GenerationService(config))
    yield running.service.http.port
    running.stop()


def _raw(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes, read the whole reply; (status, body). Status 0: closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request)
        reply = connection.makefile("rb").read()
    if not reply.startswith(b"HTTP/1."):
        return 0, reply
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _post(path: str, body: bytes, headers: str = "", length: str | None = None) -> bytes:
    declared = str(len(body)) if length is None else length
    length_line = f"Content-Length: {declared}\r\n" if declared != "-" else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\n{length_line}{headers}\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (_post("/generate", b'{"inputs": "Hi"}', length="-5"), 400),
        (_post("/generate", b'{"inputs": "Hi"}', length="12abc"), 400),
        (_post("/generate", b'{"inputs": "Hi"}', length="-"), 411),
        (
            _post("/generate", b"5\r\nhello\r\n0\r\n\r\n", "Transfer-Encoding: chunked\r\n", "-"),
            411,
        ),
        (_post("/generate", b"x" * ((1 << 20) + 1)), 413),
        (_post("/v1/chat/completions", b"x" * ((1 << 20) + 1)), 413),
        (_post("/generate", b"[" * 100_000 + b"]" * 100_000), 422),
        (_post("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000), 400),
        (_post("/generate", b'{"inputs": "\\ud800 lone"}'), 422),
        (
            _post(
                "/v1/chat/completions",
                b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
            ),
            400,
        ),
        (_post("/generate", b'{"inputs": "Hi"}', length="5"), 422),  # cut short: not JSON
        (b"PUT /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    ],
)
def test_bad_framing_and_hostile_json_get_a_status(strict_http, request_bytes, status):
    code, body = _raw(strict_http, request_bytes)
    assert code == status, body[:300]
    assert b"error" in body


def test_half_sent_requests_and_idle_connections_cannot_hold_the_http_api(strict_http):
    """Two connections that send part of a request and go silent hold both slots: a third gets
    503 at once. Their read times out (1 s here): the half-sent body is answered 408, and the
    API serves again."""
    partial = _post("/generate", b'{"inputs": "Hi", "param')[:-3]
    held = [socket.create_connection(("127.0.0.1", strict_http), timeout=10) for _ in range(2)]
    try:
        held[0].sendall(partial)  # headers and part of the body
        held[1].sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # part of the headers
        time.sleep(0.3)
        code, _ = _raw(strict_http, _post("/generate", b'{"inputs": "Hi"}'))
        assert code == 503
        started = time.monotonic()
        first = held[0].makefile("rb").read()
        assert first.startswith(b"HTTP/1.0 408") or first.startswith(b"HTTP/1.1 408"), first
        assert held[1].recv(100) == b""  # headers never finished: closed
        assert time.monotonic() - started < 5
    finally:
        for connection in held:
            connection.close()
    body = json.dumps({"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).encode()
    code, reply = _raw(strict_http, _post("/generate", body))
    assert code == 200, reply[:300]

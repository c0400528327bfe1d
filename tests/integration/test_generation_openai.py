"""OpenAI chat completions on the generation service, driven by the official `openai` client over
loopback: plain and streamed answers, seeds, logprobs, stop sequences, `n`, errors as the
client's own exception types, and a generation id that comes back as accepted feedback joined to
its generation (real broker, real feedback service)."""

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from rlhf import bus
from rlhf.checkpoints import CheckpointStore
from rlhf.joining import FeedbackJoin
from rlhf.models import TINY
from rlhf.v1 import common_pb2, events_pb2, generation_pb2, generation_pb2_grpc
from services.feedback.config import FeedbackConfig
from services.feedback.main import FeedbackService
from services.generation.main import GenerationService
from tests.conftest import (
    API_KEY,
    ID_KEY,
    TENANT,
    channel,
    consume_all,
    scrape,
    serve,
    tiny_generation_config,
)

OTHER_KEY = "another-tenants-key-0123456789"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return CheckpointStore(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def generation(broker, store, cache_dir):
    """A generation service whose HTTP API requires the tenant's key."""
    config = tiny_generation_config(
        broker,
        store.root,
        cache_dir,
        max_new_tokens_limit=64,
        batch_wait_ms=20.0,
        api_keys=(f"{TENANT}={API_KEY}",),
    )
    running = serve(GenerationService(config))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def base_url(generation):
    return f"http://127.0.0.1:{generation.service.http.port}"


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def _chat(client, **options):
    values = {"model": TINY, "messages": MESSAGES, "max_tokens": 12, "seed": 7}
    return client.chat.completions.create(**{**values, **options})


def test_models_lists_the_served_policy(client):
    [model] = client.models.list().data
    assert model.id == TINY and model.owned_by == "rlhf-platform"
    assert client.models.retrieve(TINY).id == TINY
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_plain_completion_carries_its_generation_id(client):
    raw = client.chat.completions.with_raw_response.create(
        model=TINY, messages=MESSAGES, max_tokens=12, seed=3
    )
    answer = raw.parse()
    [choice] = answer.choices
    assert answer.object == "chat.completion" and answer.model == TINY
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 12 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # The signed id three ways: completion id, header, and on the choice (an extra key the
    # client keeps in model_extra).
    assert answer.id.startswith("g") and raw.headers["x-generation-id"] == answer.id
    assert choice.model_extra["generation_id"] == answer.id
    version = choice.model_extra["policy_version"]
    assert answer.system_fingerprint == f"rlhf-policy-v{version}"
    assert raw.headers["x-policy-version"] == str(version)


def test_seeded_answers_repeat_and_match_grpc(client, generation):
    first = _chat(client, seed=11, temperature=0.9)
    again = _chat(client, seed=11, temperature=0.9)
    other = _chat(client, seed=12, temperature=0.9)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content
    assert first.id != again.id  # each answer is its own generation
    # The same request over gRPC: one core, the same answer.
    with channel(generation, API_KEY) as opened:
        reply = generation_pb2_grpc.GenerationServiceStub(opened).Generate(
            generation_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(**m) for m in MESSAGES],
                sampling=common_pb2.SamplingParams(max_new_tokens=12, temperature=0.9, seed=11),
            )
        )
    assert reply.text == first.choices[0].message.content


def test_streaming_sends_deltas_then_the_id_and_usage(client):
    whole = _chat(client, seed=5)
    chunks = list(_chat(client, seed=5, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(deltas) == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    [final] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason
    generation_id = final.choices[0].model_extra["generation_id"]
    assert generation_id.startswith("g") and generation_id != whole.id
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )


def test_stream_is_server_sent_events_ending_with_done(base_url):
    reply = requests.post(
        f"{base_url}/v1/chat/completions",
        json={"model": TINY, "messages": MESSAGES, "max_tokens": 4, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
        stream=True,
        timeout=60,
    )
    assert reply.headers["content-type"] == "text/event-stream"
    events = [line for line in reply.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_logprobs_are_the_sampled_tokens(client, generation):
    answer = _chat(client, seed=21, logprobs=True)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(entry.logprob <= 0 and entry.top_logprobs == [] for entry in content)
    with channel(generation, API_KEY) as opened:
        reply = generation_pb2_grpc.GenerationServiceStub(opened).Generate(
            generation_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(**m) for m in MESSAGES],
                sampling=common_pb2.SamplingParams(max_new_tokens=12, temperature=1.0, seed=21),
                return_logprobs=True,
            )
        )
    assert [e.logprob for e in content] == pytest.approx(list(reply.logprobs), abs=1e-5)
    streamed = _chat(client, seed=21, logprobs=True, stream=True)
    entries = [
        e
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, logprobs=True, top_logprobs=3)
    assert caught.value.body["param"] == "top_logprobs"


def test_stop_sequences_cut_plain_and_streamed_answers(client):
    text = _chat(client, seed=31, max_tokens=24).choices[0].message.content
    middle = next(i for i in range(4, len(text) - 3) if text[i : i + 3].strip() == text[i : i + 3])
    stop = text[middle : middle + 3]
    expected = text[: text.find(stop)]
    cut = _chat(client, seed=31, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    streamed = _chat(client, seed=31, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_n_choices_share_a_batch_each_with_its_own_id(client, generation):
    steps_before, rows_before = _batch_stats(scrape(generation))
    answer = _chat(client, n=3, seed=40, logprobs=True)
    steps_after, rows_after = _batch_stats(scrape(generation))
    rows_per_step = (rows_after - rows_before) / max(steps_after - steps_before, 1)
    ids = [choice.model_extra["generation_id"] for choice in answer.choices]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len(set(ids)) == 3 and answer.id == ids[0]
    assert rows_per_step > 1, "the choices were decoded in separate batches"
    assert answer.usage.completion_tokens == sum(len(c.logprobs.content) for c in answer.choices)
    # Choice i is seeded with seed + i.
    assert answer.choices[1].message.content == _chat(client, seed=41).choices[0].message.content
    streamed = list(_chat(client, n=2, seed=40, stream=True))
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in answer.choices[:2]]


def _batch_stats(metrics):
    """(decode steps, rows summed over them) so far."""
    values = {"count": 0.0, "sum": 0.0}
    for line in metrics.splitlines():
        for name in values:
            if line.startswith(f"rlhf_generation_batch_size_{name}"):
                values[name] = float(line.split()[1])
    return values["count"], values["sum"]


def test_errors_are_the_clients_exception_types(client, base_url):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, messages=[{"role": "wizard", "content": "Hi"}])
    assert caught.value.body["param"] == "messages[0].role"
    assert caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, max_tokens=10_000)
    assert caught.value.body["param"] == "max_tokens" and "at most 64" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, max_completion_tokens=65)
    assert caught.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError):
        _chat(client, n=50)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        _chat(client, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="empty"):
        _chat(client, messages=[{"role": "user", "content": "   "}])
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="not-the-key-at-all", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        _chat(wrong)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    # The TGI routes of the same API need the key too; the health probe does not.
    assert (
        requests.post(f"{base_url}/generate", json={"inputs": "Hi"}, timeout=10).status_code == 401
    )
    assert requests.get(f"{base_url}/health", timeout=10).status_code == 200


def test_full_queue_is_the_clients_rate_limit_error(broker, store, cache_dir):
    config = tiny_generation_config(
        broker, store.root, cache_dir, max_concurrent_requests=1, max_batch=1
    )
    running = serve(GenerationService(config))
    url = f"http://127.0.0.1:{running.service.http.port}/v1"

    def call(seed):
        with openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0) as client:
            try:
                _chat(client, seed=seed, max_tokens=48)
                return "ok"
            except openai.RateLimitError as exc:
                return exc.body["code"]

    try:
        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(call, range(12)))
    finally:
        running.stop()
    assert "rate_limit_exceeded" in outcomes and "ok" in outcomes


def test_generation_ids_come_back_as_feedback_joined_to_their_generations(broker, client):
    feedback_config = FeedbackConfig(
        kafka_bootstrap=broker.bootstrap,
        grpc_host="127.0.0.1",
        generation_id_key=ID_KEY,
        api_keys=(f"{TENANT}={API_KEY}", f"other={OTHER_KEY}"),
        http_port=0,
    )
    feedback = serve(FeedbackService(feedback_config))
    try:
        answer = _chat(client, n=2, seed=50)
        first, second = (c.model_extra["generation_id"] for c in answer.choices)
        url = f"http://127.0.0.1:{feedback.service.http.port}/v1/feedback"
        # The ids are the asking tenant's: another tenant's thumb on them is refused.
        stranger = requests.post(
            url,
            json={"generationId": first, "thumb": "THUMB_DOWN", "idempotencyKey": "x-tenant"},
            headers={"Authorization": f"Bearer {OTHER_KEY}"},
            timeout=30,
        )
        assert stranger.status_code == 403, stranger.text
        assert stranger.json()["error"]["reason"] == "other_tenant"
        submissions = [
            {"generationId": answer.id, "thumb": "THUMB_UP"},
            {"generationId": second, "ranking": {"generationIds": [second, first]}},
            {"generationId": first, "correction": {"text": "Blue."}},
        ]
        event_ids = []
        for submission in submissions:
            reply = requests.post(
                url,
                json={**submission, "idempotencyKey": uuid.uuid4().hex},
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
            event_ids.append(reply.json()["eventId"])
    finally:
        feedback.stop()
    generations = [
        r.message
        for r in consume_all(broker.bootstrap, bus.GENERATIONS, events_pb2.GenerationEvent)
        if r.message.generation_id in (first, second)
    ]
    feedbacks = [
        r.message
        for r in consume_all(broker.bootstrap, bus.FEEDBACK, events_pb2.FeedbackEvent)
        if r.message.event_id in event_ids
    ]
    join = FeedbackJoin()
    for event in generations:
        join.add_generation(event)
    joined = [pair for event in feedbacks for pair in join.add_feedback(event)]
    assert len(joined) == 3
    texts = {c.model_extra["generation_id"]: c.message.content for c in answer.choices}
    for pair in joined:
        assert pair.generation.response == texts[pair.generation.generation_id]
        assert [m.content for m in pair.generation.messages] == [m["content"] for m in MESSAGES]
        assert pair.feedback.tenant == TENANT

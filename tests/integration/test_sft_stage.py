"""The sft stage on a real broker: a demonstrations file makes the first round, user corrections
joined to their generations make the next, and each round publishes a policy checkpoint."""

import hashlib
import json
import uuid

import grpc

from rlhf import bus
from rlhf.checkpoints import POLICY, CheckpointStore
from rlhf.models import TINY, load_tokenizer
from rlhf.v1 import events_pb2, trainer_pb2, trainer_pb2_grpc
from services.trainer.main import build
from tests.conftest import OPERATOR_KEY, channel, consume_all, serve, trainer_config, wait_until


def test_file_then_corrections_become_policy_checkpoints(own_broker, cache_dir, tmp_path):
    # Its own broker: the session topics carry other tests' corrections, which it would learn too.
    broker = own_broker
    data = tmp_path / "demos.jsonl"
    data.write_text(
        "\n".join(
            [json.dumps({"prompt": "Say hi", "response": "Hi! Lovely to see you."})] * 3
            + ['{"prompt": 1}']
        )
    )
    store = CheckpointStore(tmp_path / "checkpoints")
    config = trainer_config(
        {"kafka_bootstrap": broker.bootstrap, "checkpoint_dir": store.root, "cache_dir": cache_dir},
        RLHF_TRAINER_STAGE="sft",
        RLHF_POLICY_MODEL=TINY,
        RLHF_SFT_DATA=data,
        RLHF_SFT_TRAINER_GROUP=f"sft-{uuid.uuid4().hex[:8]}",
        RLHF_SFT_ROUND_EXAMPLES=2,
        RLHF_KAFKA_MAX_POLL_INTERVAL_MS=4000,
    )
    server = serve(build(config))
    try:
        assert wait_until(lambda: store.versions(POLICY) == [1], timeout=60)
        first, _ = store.read_manifest(POLICY, 1)
        assert first.metadata["stage"] == "sft" and first.metadata["stats"]["sft/examples"] == 3
        assert first.metadata["sft_data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()

        tokenizer = load_tokenizer(cache_dir)
        with bus.Publisher(broker.bootstrap, client_id="sft-test") as publisher:
            for i in range(2):
                gid = f"sft-{uuid.uuid4().hex}"
                correction = events_pb2.FeedbackEvent(
                    event_id=f"c-{gid}",
                    feedback=events_pb2.Feedback(
                        generation_id=gid, correction=events_pb2.Correction(text="Much better.")
                    ),
                )
                thumb = events_pb2.FeedbackEvent(
                    event_id=f"t-{gid}",
                    feedback=events_pb2.Feedback(generation_id=gid, thumb=events_pb2.THUMB_UP),
                )
                generation = events_pb2.GenerationEvent(
                    generation_id=gid, prompt_token_ids=tokenizer(f"Prompt {i}")["input_ids"]
                )
                publisher.publish(bus.FEEDBACK, gid, correction)  # before its generation
                publisher.publish(bus.FEEDBACK, gid, thumb)  # not a demonstration
                publisher.publish(bus.GENERATIONS, gid, generation)
        assert wait_until(lambda: store.versions(POLICY) == [1, 2], timeout=60)
        second, _ = store.read_manifest(POLICY, 2)
        assert second.metadata["stats"]["sft/examples"] == 2 and second.parent_version == 1

        announced = consume_all(
            broker.bootstrap, bus.POLICY_CHECKPOINTS, events_pb2.CheckpointEvent
        )
        shas = {r.message.manifest_sha256 for r in announced}
        assert {store.read_manifest(POLICY, v)[1] for v in (1, 2)} <= shas

        with channel(server, OPERATOR_KEY) as opened:
            control = trainer_pb2_grpc.TrainerServiceStub(opened)
            status = control.GetStatus(trainer_pb2.GetStatusRequest())
            assert status.stage == "sft" and status.policy_version == 2
            try:
                control.Rollback(trainer_pb2.RollbackRequest(version=1), timeout=5)
                raise AssertionError("the sft stage must refuse rollbacks")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop()

    # A restarted stage does not train the same file again on top of itself.
    restarted = build(config)
    try:
        assert restarted.loop.status.pending_prompts == 0
    finally:
        restarted.stop()

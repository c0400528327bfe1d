"""The `rlhf` command line against real services: broker, generation, feedback, reward and both
trainer stages over loopback, tiny models. Commands run through `main(argv)` with stdout and
stderr captured, and as a real `python -m rlhf.cli` subprocess."""

import json
import os
import re
import subprocess
import sys
import uuid
from concurrent import futures

import grpc
import pytest

from rlhf import bus
from rlhf.broker import free_port
from rlhf.cli import main
from rlhf.ids import GenerationIdSigner
from rlhf.models import TINY
from rlhf.v1 import events_pb2, trainer_pb2, trainer_pb2_grpc
from services.feedback.config import FeedbackConfig
from services.feedback.main import FeedbackService
from services.generation.config import GenerationConfig
from services.generation.main import GenerationService
from services.reward.config import RewardConfig
from services.reward.main import RewardService
from services.trainer.main import build
from tests.conftest import (
    API_KEY,
    ID_KEY,
    OPERATOR_KEY,
    READER_KEY,
    TENANT,
    channel,
    consume_all,
    serve,
    trainer_config,
    wait_until,
)


@pytest.fixture(scope="module")
def platform(broker, cache_dir, tmp_path_factory):
    """Every service the command line talks to, and an up.env naming them like `make up`."""
    root = tmp_path_factory.mktemp("cli")
    common = {
        "kafka_bootstrap": broker.bootstrap,
        "checkpoint_dir": root / "checkpoints",
        "cache_dir": cache_dir,
    }
    group = uuid.uuid4().hex[:8]
    servers = {"reward": serve(RewardService(RewardConfig(**common, reward_model=TINY)))}
    servers["generation"] = serve(
        GenerationService(
            GenerationConfig(
                **common,
                policy_model=TINY,
                generation_id_key=ID_KEY,
                api_keys=(f"{TENANT}={API_KEY}",),
                http_port=0,
            )
        )
    )
    servers["feedback"] = serve(
        FeedbackService(
            FeedbackConfig(**common, generation_id_key=ID_KEY, api_keys=(f"{TENANT}={API_KEY}",))
        )
    )
    trainer = {
        "RLHF_POLICY_MODEL": TINY,
        "RLHF_REWARD_MODEL": TINY,
        "RLHF_KAFKA_MAX_POLL_INTERVAL_MS": 4000,
    }
    servers["trainer"] = serve(
        build(
            trainer_config(
                common,
                **trainer,
                RLHF_REWARD_ADDRESS=f"127.0.0.1:{servers['reward'].port}",
                RLHF_TRAINER_GROUP=f"cli-ppo-{group}",
                # No update during the tests: answers stay comparable across calls; versions
                # come from the Checkpoint call instead.
                RLHF_PPO_BATCH_SIZE=10_000,
            )
        )
    )
    servers["reward-trainer"] = serve(
        build(
            trainer_config(
                common,
                **trainer,
                RLHF_TRAINER_STAGE="reward",
                RLHF_REWARD_TRAINER_GROUP=f"cli-rw-{group}",
                # No round either: the session's topics hold other tests' feedback, enough for
                # a round that would publish a reward model mid-test.
                RLHF_REWARD_ROUND_EXAMPLES=10_000,
            )
        )
    )
    env_file = root / "up.env"
    lines = [f"RLHF_API_KEY={API_KEY}", f"RLHF_OPERATOR_KEY={OPERATOR_KEY}"] + [
        f"RLHF_{name.upper().replace('-', '_')}_ADDRESS=127.0.0.1:{server.port}"
        for name, server in servers.items()
    ]
    env_file.write_text("\n".join(lines) + "\n")
    yield env_file, servers
    for name in ("trainer", "reward-trainer", "feedback", "generation", "reward"):
        servers[name].stop()


@pytest.fixture
def rlhf(platform, capsys):
    """Run a command against the platform: (exit status, stdout, stderr)."""
    env_file, _ = platform

    def run(*argv):
        status = main(["--env-file", str(env_file), *argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return status, out, err

    return run


def _generate(rlhf, prompt="Hello there", seed=5):
    status, out, _ = rlhf(
        "generate", prompt, "--max-new-tokens", "6", "--seed", str(seed), "--json"
    )
    assert status == 0
    return json.loads(out)


def test_generate_streams_the_answer_then_names_its_id(rlhf):
    status, out, err = rlhf("generate", "Hello there", "--max-new-tokens", "6", "--seed", "5")
    assert status == 0
    reference = _generate(rlhf)  # same seed, unary-shaped JSON of the final message
    assert out == reference["text"] + "\n"  # stdout is exactly the answer
    assert "generation id " in err and "policy v0, 6 tokens, finished by length" in err
    assert reference["completionTokens"] == 6 and reference["generationId"] not in err


def test_thumb_is_stored_and_a_resend_with_the_same_key_counts_once(rlhf, broker):
    generation_id = _generate(rlhf)["generationId"]
    key = f"cli-{uuid.uuid4().hex}"
    status, out, _ = rlhf("feedback", generation_id, "up", "--idempotency-key", key)
    assert status == 0 and out.startswith("stored: event ") and key in out
    status, out, _ = rlhf("feedback", generation_id, "up", "--idempotency-key", key)
    assert status == 0 and out.startswith("already stored: event ")
    records = consume_all(broker.bootstrap, bus.FEEDBACK, events_pb2.FeedbackEvent)
    mine = [r.message for r in records if r.message.feedback.idempotency_key == key]
    assert len(mine) == 1 and mine[0].feedback.thumb == events_pb2.THUMB_UP


def test_ranking_correction_and_score_forms(rlhf, broker):
    first = _generate(rlhf, "How was your day?", seed=1)["generationId"]
    second = _generate(rlhf, "How was your day?", seed=2)["generationId"]
    forms = [
        ("rank", second, first),
        ("correct", "A lovely day, thank you!"),
        ("score", "0.25"),
        ("--comment", "too short", "down", "--tag", "length"),
    ]
    for form in forms:
        status, out, err = rlhf("feedback", first, *form)
        assert status == 0 and out.startswith("stored: "), (form, err)
    records = consume_all(broker.bootstrap, bus.FEEDBACK, events_pb2.FeedbackEvent)
    signals = {
        r.message.feedback.WhichOneof("signal"): r.message.feedback
        for r in records
        if r.message.feedback.generation_id == first
    }
    assert list(signals["ranking"].ranking.generation_ids) == [second, first]
    assert signals["correction"].correction.text == "A lovely day, thank you!"
    assert signals["score"].score.value == pytest.approx(0.25)
    assert signals["thumb"].comment == "too short" and list(signals["thumb"].tags) == ["length"]


@pytest.mark.parametrize(
    ("argv", "message", "code"),
    [
        (("--api-key", "wrong-key-0123456789", "up"), "refused the API key", 1),
        (("score", "2"), "rejected the request: score must be a number in [0, 1]", 1),
        (("rank", "a", "b"), "rejected the request: ", 1),
        (("up", "1"), "up takes no value", 2),
        (("score", "high"), "score takes a number in [0, 1], not 'high'", 2),
        (("correct",), "correct takes one TEXT", 2),
    ],
)
def test_feedback_refusals_are_one_line(rlhf, argv, message, code):
    generation_id = _generate(rlhf)["generationId"]
    status, out, err = rlhf("feedback", generation_id, *argv)
    assert status == code and out == ""
    assert err.startswith("rlhf: ") and message in err and err.count("\n") == 1, err


def test_forged_and_expired_generation_ids_are_refused(rlhf):
    forged = GenerationIdSigner(b"f" * 32).issue(0)
    status, _, err = rlhf("feedback", forged, "up")
    assert status == 1 and "rlhf: feedback (127.0.0.1:" in err and "refused: " in err, err
    expired = GenerationIdSigner(ID_KEY.encode()).issue(0, now=1000)
    status, _, err = rlhf("feedback", expired, "up")
    assert status == 1 and "refused: " in err and "expired" in err, err


def test_status_shows_the_served_policy_and_both_trainer_stages(rlhf):
    status, out, err = rlhf("status", "--verbose")
    assert status == 0, err
    for heading in ("served policy (generation)", "ppo trainer", "reward trainer"):
        assert heading in out
    assert "tiny-random (local backend)" in out and "published reward model" in out
    # Each stage says where it is in the recipe: here ppo waits for a trained reward model.
    assert wait_until(lambda: "phase" in rlhf("status")[1])
    words = " ".join(re.sub(r"[│┌┐└┘├┤┬┴┼─]", " ", rlhf("status")[1]).split())
    assert "phase waiting: no PPO until the reward service serves reward model v1" in words
    assert "phase collecting" in words  # the reward stage
    assert "prompts dropped 0" in words


def test_status_without_a_reward_trainer_says_so_and_succeeds(rlhf):
    status, out, _ = rlhf("status", "--reward-trainer", f"127.0.0.1:{free_port()}")
    assert status == 0 and "ppo trainer" in out
    assert "reward trainer: cannot reach reward-trainer" in out


def test_unreachable_service_is_one_line_and_exit_1(rlhf):
    address = f"127.0.0.1:{free_port()}"
    status, out, err = rlhf("--generation", address, "generate", "hi")
    assert status == 1 and out == ""
    assert err == f"rlhf: cannot reach generation ({address}): is `make up` running?\n"


def _checkpoint_now(servers, name="trainer"):
    """A new version to list and roll back to (the Checkpoint call; the CLI does not wrap it)."""
    with channel(servers[name], OPERATOR_KEY) as opened:
        stub = trainer_pb2_grpc.TrainerServiceStub(opened)
        return stub.Checkpoint(trainer_pb2.CheckpointRequest(), timeout=60).version


def _rows(table):
    """The words of each row of a checkpoints table."""
    return [line.split() for line in table.splitlines() if re.match(r"\s*v\d+ ", line)]


def test_pause_and_resume(rlhf):
    status, out, _ = rlhf("pause")
    assert status == 0 and out.startswith("ppo trainer paused at step 0, last published v")
    assert "│ state                    │ paused" in rlhf("status")[1]
    status, out, _ = rlhf("resume")
    assert status == 0 and out.startswith("ppo trainer running at step 0")
    assert "│ state                    │ running" in rlhf("status")[1]
    status, out, _ = rlhf("pause", "--stage", "reward")
    assert status == 0 and out.startswith("reward trainer paused at step 0")
    assert rlhf("resume", "--stage", "reward")[0] == 0


def test_checkpoints_and_a_pinned_rollback_the_generation_service_follows(rlhf, platform):
    _, servers = platform
    first, second = _checkpoint_now(servers), _checkpoint_now(servers)
    status, out, err = rlhf("checkpoints")
    assert status == 0, err
    assert [row[0] for row in _rows(out)[:2]] == [f"v{second}", f"v{first}"]  # newest first

    status, out, err = rlhf("rollback", str(first), "--pin", "--wait")
    assert status == 0, err
    rolled = second + 1
    assert out.splitlines() == [
        f"published v{rolled} with the weights of v{first}",
        f"ppo trainer paused: v{rolled} stays until `rlhf resume`",
        f"generation serves v{rolled}",
    ]
    _, out, _ = rlhf("checkpoints", "--limit", "1")
    [row] = _rows(out)
    assert row[0] == f"v{rolled}" and row[-4:] == ["served,", "weights", "of", f"v{first}"]
    assert "│ state                    │ paused" in rlhf("status")[1]
    assert rlhf("resume")[0] == 0


def test_rollback_to_a_version_not_in_the_store_is_one_line(rlhf):
    status, out, err = rlhf("rollback", "999")
    assert status == 1 and out == ""
    assert err.startswith("rlhf: trainer (127.0.0.1:") and "not found: no policy version 999" in err


def test_reward_checkpoints_before_any_round(rlhf):
    assert rlhf("checkpoints", "--stage", "reward")[1] == "no reward checkpoints yet\n"


@pytest.fixture
def unimplemented_trainer():
    """A real gRPC server whose TrainerService implements nothing (the base servicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
        trainer_pb2_grpc.TrainerServiceServicer(), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize(
    "argv", [("pause",), ("resume",), ("checkpoints",), ("rollback", "1", "--pin")]
)
def test_a_trainer_without_the_call_is_reported_as_such(rlhf, unimplemented_trainer, argv):
    status, _, err = rlhf(*argv, "--trainer", unimplemented_trainer)
    assert status == 1
    assert err == (
        f"rlhf: trainer ({unimplemented_trainer}) does not implement this call "
        "(an older version of the service?)\n"
    )


def _subprocess(argv, env_file, **env):
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=env_file.parent,
    )


def test_as_a_process_addresses_come_from_the_environment(platform):
    env_file, servers = platform
    addresses = {
        f"RLHF_{name.upper().replace('-', '_')}_ADDRESS": f"127.0.0.1:{server.port}"
        for name, server in servers.items()
    }
    # Keys come from the environment too; a reader's is enough to watch.
    done = _subprocess(["status"], env_file, **addresses, RLHF_READER_KEY=READER_KEY)
    assert done.returncode == 0, done.stderr
    assert "ppo trainer" in done.stdout and "reward trainer" in done.stdout
    down = _subprocess(["status"], env_file, RLHF_GENERATION_ADDRESS=f"127.0.0.1:{free_port()}")
    assert down.returncode == 1 and down.stdout == ""
    assert (
        down.stderr.startswith("rlhf: cannot reach generation") and "Traceback" not in down.stderr
    )


def test_steering_the_trainer_needs_the_operator_key(platform, capsys, tmp_path):
    """A reader key shows status but may not roll back; no key at all is refused, and each
    refusal is one line naming the key to pass."""
    _, servers = platform
    addresses = [f"--{name}=127.0.0.1:{server.port}" for name, server in servers.items()]
    empty = tmp_path / "none.env"

    def run(*argv, **environ):
        old = {name: os.environ.get(name) for name in environ}
        os.environ.update(environ)
        try:
            status = main(["--env-file", str(empty), *addresses, *argv])
        finally:
            for name, value in old.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        out, err = capsys.readouterr()
        return status, out, err

    status, out, err = run("status", RLHF_READER_KEY=READER_KEY)
    assert status == 0 and "ppo trainer" in out, err
    status, _, err = run("rollback", "1", RLHF_READER_KEY=READER_KEY)
    assert status == 1 and "refused: " in err and "needs the operator key" in err, err
    status, _, err = run("pause")
    assert status == 1 and "refused the operator key: pass --operator-key" in err, err
    assert err.count("\n") == 1
    status, out, err = run("pause", "--operator-key", OPERATOR_KEY)
    assert status == 0 and "paused" in out, err
    assert run("resume", "--operator-key", OPERATOR_KEY)[0] == 0

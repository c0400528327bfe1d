"""The `rlhf` command line without servers: where addresses come from, how words become a
feedback signal, and that every gRPC failure reads as one human line."""

import subprocess
import sys

import grpc
import pytest

from rlhf.cli import (
    SERVICES,
    Target,
    UsageError,
    build_parser,
    explain,
    given_addresses,
    resolve_addresses,
    set_signal,
)
from rlhf.v1 import events_pb2


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details=""):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_addresses_flag_beats_environment_beats_up_env_beats_default(tmp_path):
    env_file = tmp_path / "up.env"
    env_file.write_text(
        "RLHF_API_KEY=k\nRLHF_GENERATION_ADDRESS=10.0.0.1:1\nRLHF_FEEDBACK_ADDRESS=10.0.0.1:2\n"
        "RLHF_TRAINER_ADDRESS=10.0.0.1:3\n"
    )
    environ = {"RLHF_GENERATION_ADDRESS": "10.0.0.2:1", "RLHF_FEEDBACK_ADDRESS": "10.0.0.2:2"}
    flags = {"generation": "10.0.0.3:1"}
    addresses = resolve_addresses(flags, environ, env_file)
    assert addresses == {
        "generation": "10.0.0.3:1",
        "feedback": "10.0.0.2:2",
        "trainer": "10.0.0.1:3",
        "reward-trainer": "127.0.0.1:50055",
        "release-trainer": "127.0.0.1:50057",
    }
    assert resolve_addresses({}, {}, tmp_path / "missing.env")["trainer"] == "127.0.0.1:50054"
    assert set(addresses) == set(SERVICES)
    # only the defaulted ones are not "configured": rlhf status skips a release stage nobody runs
    assert set(given_addresses(flags, environ, env_file)) == {"generation", "feedback", "trainer"}
    assert set(given_addresses({"release-trainer": "h:1"}, {}, tmp_path / "x")) == {
        "release-trainer"
    }


def test_options_work_before_and_after_the_command():
    parser = build_parser()
    before = parser.parse_args(["--timeout", "5", "--trainer", "h:1", "status"])
    after = parser.parse_args(["status", "--timeout", "5", "--trainer", "h:1"])
    assert (before.timeout, before.trainer) == (after.timeout, after.trainer) == (5.0, "h:1")
    assert parser.parse_args(["pause"]).timeout == 60.0


@pytest.mark.parametrize(
    ("words", "field", "value"),
    [
        (("up",), "thumb", events_pb2.THUMB_UP),
        (("down",), "thumb", events_pb2.THUMB_DOWN),
        (("score", "0.5"), "score", 0.5),
        (("correct", "Better."), "correction", "Better."),
        (("rank", "b", "a"), "ranking", ["b", "a"]),
    ],
)
def test_signal_words(words, field, value):
    feedback = events_pb2.Feedback(generation_id="a")
    set_signal(feedback, words[0], words[1:])
    assert feedback.WhichOneof("signal") == field
    got = {
        "thumb": feedback.thumb,
        "score": feedback.score.value,
        "correction": feedback.correction.text,
        "ranking": list(feedback.ranking.generation_ids),
    }[field]
    assert got == value


@pytest.mark.parametrize(
    "words", [("up", "x"), ("score",), ("score", "lots"), ("correct", "a", "b"), ("rank", "a")]
)
def test_signal_words_that_do_not_fit_are_usage_errors(words):
    with pytest.raises(UsageError):
        set_signal(events_pb2.Feedback(), words[0], words[1:])


TARGET = Target("trainer", "127.0.0.1:50054")


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50054",
            "cannot reach trainer (127.0.0.1:50054): is `make up` running?",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "broker did not acknowledge",
            "trainer (127.0.0.1:50054) is unavailable: broker did not acknowledge",
        ),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", "did not answer within 7 s"),
        (grpc.StatusCode.UNAUTHENTICATED, "bad key", "refused the operator key"),
        (grpc.StatusCode.UNIMPLEMENTED, "", "does not implement this call"),
        (grpc.StatusCode.NOT_FOUND, "no version 9", "not found: no version 9"),
        (grpc.StatusCode.INTERNAL, "boom", "failed with INTERNAL: boom"),
    ],
)
def test_every_failure_is_one_human_line(code, details, expected):
    message = explain(TARGET, FakeRpcError(code, details), timeout=7)
    assert expected in message and "\n" not in message


def test_the_command_line_starts_without_torch():
    # Every command builds the whole parser, `rlhf import` included; torch and transformers
    # would add seconds to `rlhf status`.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, rlhf.cli; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'rlhf.importer'" in loaded
    assert "'torch'" not in loaded and "'transformers'" not in loaded


def test_import_is_a_command_with_the_importers_arguments(tmp_path):
    args = build_parser().parse_args(
        ["import", "preferences", str(tmp_path / "hh.jsonl"), "--name", "hh", "--dry-run"]
    )
    assert (args.kind, args.name, args.dry_run) == ("preferences", "hh", True)
    assert args.run.__name__ == "cmd_import"


def _rendered(table):
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_status_shows_the_canary_its_thumbs_and_the_verdict():
    from rlhf.cli import policy_table, release_table
    from rlhf.v1 import generation_pb2, trainer_pb2

    status = trainer_pb2.TrainerStatus(
        stage="release",
        phase="training",
        release=trainer_pb2.ReleaseStatus(
            incumbent_version=3,
            candidate_version=5,
            candidate_share=0.1,
            candidate_thumbs_up=30,
            candidate_thumbs=60,
            incumbent_thumbs_up=400,
            incumbent_thumbs=540,
            verdict="collecting",
            difference=-0.24,
            lower=-0.4,
            upper=-0.08,
            elapsed_seconds=1800,
            last_decision="v4 rolled back, v3 kept",
        ),
    )
    text = _rendered(release_table(status))
    for expected in (
        "v5 answers 10% for 30 min",
        "candidate 30/60, incumbent 400/540",
        "collecting: difference -0.240 [-0.400, -0.080]",
        "v4 rolled back, v3 kept",
    ):
        assert expected in text
    idle = trainer_pb2.TrainerStatus(release=trainer_pb2.ReleaseStatus(incumbent_version=3))
    assert "none running" in _rendered(release_table(idle))
    assert "last gate" not in _rendered(release_table(idle))
    refused = trainer_pb2.ReleaseGate(
        candidate_version=6,
        incumbent_version=3,
        summary="v6 refused by the gate against v3: repetition: 62.0% repeated bigrams",
        failed=["repetition"],
        candidate=trainer_pb2.GateMeasures(
            reward=0.1, reward_scored=True, length=31.0, repetition=0.62, kl=4.2
        ),
        incumbent=trainer_pb2.GateMeasures(length=12.5, repetition=0.02, kl=1.5),
    )
    idle.release.gate.CopyFrom(refused)
    text = _rendered(release_table(idle))
    assert "v6 refused by the gate against v3: repetition" in text
    assert "candidate: reward +0.100, 31.0 tokens, 62.0% repeated bigrams, KL 4.20 nats" in text
    assert "incumbent: reward not scored, 12.5 tokens, 2.0% repeated bigrams" in text
    info = generation_pb2.PolicyInfo(version=3, candidate_version=5, candidate_share=0.1)
    assert "v5 answers 10%" in _rendered(policy_table(info))
    assert "canary" not in _rendered(policy_table(generation_pb2.PolicyInfo(version=3)))


def test_rollback_without_a_version_is_the_canarys():
    parser = build_parser()
    assert parser.parse_args(["rollback"]).version is None
    assert parser.parse_args(["rollback", "4"]).version == 4
    assert parser.parse_args(["promote"]).command == "promote"

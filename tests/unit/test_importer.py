"""Offline import: HH-RLHF and demonstration lines are validated line by line (every fault a
reason), become the events the live services would publish, with ids from the content, and a
line counts as imported only once the broker acknowledged all of its events."""

import io
import json
import re

import pytest

from rlhf import bus
from rlhf.bus import BusUnavailable
from rlhf.importer import (
    EXIT_NOTHING_IMPORTED,
    EXIT_OK,
    EXIT_UNCONFIRMED,
    DemonstrationLine,
    Limits,
    LineError,
    Preference,
    check_name,
    decode_line,
    demonstration_events,
    import_file,
    parse_demonstration,
    parse_hh,
    parse_preference,
    preference_events,
    read_lines,
)
from rlhf.scoring import reward_prompt

LIMITS = Limits()
CONVERSATION = "\n\nHuman: What is a fruit?\n\nAssistant: A plant part.\n\nHuman: Name one."


class WordPrompts:
    """A stand-in tokenizer: the chat template is "role: content" lines, a token is a word."""

    def chat(self, messages):
        return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"

    def encode(self, text):
        return [len(word) for word in text.split()]


PROMPTS = WordPrompts()


def hh(chosen="An apple.", rejected="No.", conversation=CONVERSATION):
    return json.dumps(
        {
            "chosen": f"{conversation}\n\nAssistant: {chosen}",
            "rejected": f"{conversation}\n\nAssistant: {rejected}",
        }
    )


def demo(prompt="Say hi", response="Hi there!"):
    return json.dumps({"prompt": prompt, "response": response})


# -- parsing --------------------------------------------------------------------------------


def test_hh_transcripts_become_chat_turns_and_the_last_answer():
    turns, answer = parse_hh(f"{CONVERSATION}\n\nAssistant:  An apple. ")
    assert turns == (
        ("user", "What is a fruit?"),
        ("assistant", "A plant part."),
        ("user", "Name one."),
    )
    assert answer == "An apple."
    # Some copies of the dataset lost the leading blank line: same transcript.
    assert parse_hh("Human: Hi\n\nAssistant: Hello") == ((("user", "Hi"),), "Hello")


@pytest.mark.parametrize(
    ("transcript", "reason"),
    [
        ("just text", "expected"),
        ("Intro\n\nHuman: Hi\n\nAssistant: Hello", "expected"),
        ("\n\nAssistant: Hello", "start with a Human turn"),
        ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: And?", "end with an Assistant turn"),
        ("\n\nHuman:  \n\nAssistant: Hello", "turn 1 (Human) is empty"),
        ("\n\nHuman: Hi\n\nAssistant: ", "last Assistant turn is empty"),
    ],
)
def test_malformed_hh_transcripts_are_refused_with_the_reason(transcript, reason):
    with pytest.raises(LineError, match=re.escape(reason)):
        parse_hh(transcript)


def test_a_preference_line_is_the_shared_conversation_and_both_answers():
    preference = parse_preference(hh(), LIMITS)
    assert preference.turns[-1] == ("user", "Name one.")
    assert (preference.chosen, preference.rejected) == ("An apple.", "No.")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not JSON"),
        ('["chosen", "rejected"]', "expected a JSON object, got list"),
        (json.dumps({"rejected": "x"}), '"chosen" is missing'),
        (demo(), "\"chosen\" is missing (it has 'prompt': a line of demonstrations?)"),
        (json.dumps({"chosen": 3, "rejected": "x"}), '"chosen" must be a string, got int'),
        (json.dumps({"chosen": " ", "rejected": "x"}), '"chosen" is empty'),
        (json.dumps({"chosen": "\ud800", "rejected": "x"}), "lone surrogate"),
        (
            json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "no turns"}),
            "rejected: expected",
        ),
        (hh(rejected=""), "rejected: the last Assistant turn is empty"),
        (
            json.dumps(
                {
                    "chosen": "\n\nHuman: Hi\n\nAssistant: A",
                    "rejected": "\n\nHuman: Bye\n\nAssistant: B",
                }
            ),
            "differ before the last Assistant turn",
        ),
        (hh(chosen="Same.", rejected=" Same. "), "the same answer"),
    ],
)
def test_malformed_preference_lines_are_refused_with_the_reason(line, reason):
    with pytest.raises(LineError, match=re.escape(reason)):
        parse_preference(line, LIMITS)


def test_preference_size_bounds_are_those_of_the_live_services():
    assert LIMITS.max_text_chars == 8192 and LIMITS.max_prompt_chars == 16384
    small = Limits(max_messages=2, max_prompt_chars=30, max_text_chars=5)
    with pytest.raises(LineError, match="3 turns before the answer; at most 2"):
        parse_preference(hh(), small)
    with pytest.raises(LineError, match="conversation exceeds 30 characters"):
        parse_preference(hh(), Limits(max_prompt_chars=30))
    with pytest.raises(LineError, match="chosen exceeds 5 characters"):
        parse_preference(hh(), Limits(max_text_chars=5))


def test_a_demonstration_line_is_a_prompt_and_a_response():
    assert parse_demonstration(demo(), LIMITS) == DemonstrationLine("Say hi", "Hi there!")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("", "not JSON"),
        ("7", "expected a JSON object, got int"),
        (json.dumps({"response": "x"}), '"prompt" is missing'),
        (hh(), "\"prompt\" is missing (it has 'chosen': a line of preferences?)"),
        (demo(response="   "), '"response" is empty'),
        (demo(prompt=["Say", "hi"]), '"prompt" must be a string, got list'),
        (demo(prompt="x" * 16385), "prompt exceeds 16384 characters"),
        (demo(response="x" * 8193), "response exceeds 8192 characters"),
    ],
)
def test_malformed_demonstration_lines_are_refused_with_the_reason(line, reason):
    with pytest.raises(LineError, match=re.escape(reason)):
        parse_demonstration(line, LIMITS)


def test_bytes_that_are_not_utf8_are_a_line_error():
    with pytest.raises(LineError, match="not UTF-8"):
        decode_line(b'{"prompt": "caf\xe9"}')


def test_lines_longer_than_the_bound_are_skipped_without_being_read_whole():
    handle = io.BytesIO(b"short\n" + b"x" * 25 + b"\nafter\nlast")
    assert list(read_lines(handle, max_bytes=10)) == [
        (1, b"short\n"),
        (2, None),
        (3, b"after\n"),
        (4, b"last"),
    ]


def test_dataset_names_must_be_usable_in_ids():
    assert check_name("hh-helpful_v1.2") == "hh-helpful_v1.2"
    for bad in ("", "-x", "has space", "a:b", "x" * 65):
        with pytest.raises(ValueError, match="dataset name"):
            check_name(bad)


# -- events ---------------------------------------------------------------------------------


def test_a_preference_is_two_generations_and_a_ranking_all_keyed_by_the_chosen_id():
    rejected_gen, chosen_gen, feedback = preference_events(
        parse_preference(hh(), LIMITS), "hh", PROMPTS, LIMITS
    )
    chosen_id = chosen_gen.message.generation_id
    assert [e.topic for e in (rejected_gen, chosen_gen, feedback)] == [
        bus.GENERATIONS,
        bus.GENERATIONS,
        bus.FEEDBACK,
    ]
    # One key, rejected first: the consumer that joins the ranking has seen both answers.
    assert {e.key for e in (rejected_gen, chosen_gen, feedback)} == {chosen_id}
    assert chosen_id.startswith("import:hh:") and chosen_id.endswith(":chosen")

    chosen, rejected = chosen_gen.message, rejected_gen.message
    assert (chosen.response, rejected.response) == ("An apple.", "No.")
    assert [(m.role, m.content) for m in chosen.messages] == [
        ("user", "What is a fruit?"),
        ("assistant", "A plant part."),
        ("user", "Name one."),
    ]
    assert chosen.prompt == PROMPTS.chat(chosen.messages) == rejected.prompt
    assert list(chosen.prompt_token_ids) == PROMPTS.encode(chosen.prompt)
    assert reward_prompt(chosen) == (
        "user: What is a fruit?\nassistant: A plant part.\nuser: Name one."
    )
    for generation in (chosen, rejected):
        assert generation.policy_version == 0 and generation.finish_reason == "import"
        assert generation.HasField("created_at") and not generation.response_logprobs

    event = feedback.message
    assert event.tenant == "import:hh" and event.policy_version == 0
    assert event.feedback.generation_id == chosen_id
    assert list(event.feedback.ranking.generation_ids) == [chosen_id, rejected.generation_id]
    assert len(event.event_id) == 32 and event.feedback.idempotency_key


def test_ids_come_from_the_name_and_the_content_not_the_formatting():
    def ids(line, name="hh"):
        events = preference_events(parse_preference(line, LIMITS), name, PROMPTS, LIMITS)
        return [e.message.generation_id for e in events[:2]] + [events[2].message.event_id]

    first = ids(hh())
    reformatted = json.dumps(json.loads(hh()), indent=1).replace("\n", " ")
    assert ids(hh()) == first == ids(reformatted)
    assert ids(hh(chosen="A pear.")) != first
    assert set(ids(hh(), name="other")).isdisjoint(first)


def test_prompts_longer_than_the_generation_service_accepts_are_refused():
    preference = parse_preference(hh(), LIMITS)
    with pytest.raises(LineError, match="prompt has 13 tokens; at most 5"):
        preference_events(preference, "hh", PROMPTS, Limits(max_prompt_tokens=5))


def test_a_demonstration_is_a_plain_prompt_generation_and_its_correction():
    generation, correction = demonstration_events(
        DemonstrationLine("Say hi", "Hi there!"), "demos", PROMPTS, LIMITS
    )
    gid = generation.message.generation_id
    assert (generation.topic, correction.topic) == (bus.GENERATIONS, bus.FEEDBACK)
    assert generation.key == correction.key == gid and gid.endswith(":prompt")
    # As the sft stage reads RLHF_SFT_DATA: the prompt as it is, tokenised without a template.
    assert generation.message.prompt == "Say hi" and not generation.message.messages
    assert list(generation.message.prompt_token_ids) == PROMPTS.encode("Say hi")
    assert generation.message.response == "" and generation.message.finish_reason == "import"
    event = correction.message
    assert event.feedback.correction.text == "Hi there!" and event.tenant == "import:demos"
    assert event.feedback.generation_id == gid


def test_demonstrations_the_sft_stage_would_drop_are_refused():
    line = DemonstrationLine("one two three", "four five")
    with pytest.raises(LineError, match="longer than 5 tokens"):
        demonstration_events(line, "demos", PROMPTS, Limits(sft_max_tokens=5))


# -- a whole file ---------------------------------------------------------------------------


class Future:
    def __init__(self, error=None):
        self.error = error

    def get(self, timeout=None):
        if self.error is not None:
            raise self.error
        return None


class FakePublisher:
    """Acknowledges every event, except that events of lines whose answer contains `fail`
    fail in flight, and `publish_async` refuses from the `refuse_after`th event on."""

    def __init__(self, fail="", refuse_after=None):
        self.sent = []
        self.fail = fail
        self.refuse_after = refuse_after

    def publish_async(self, topic, key, message, headers=None):
        if self.refuse_after is not None and len(self.sent) >= self.refuse_after:
            raise BusUnavailable("broker down")
        self.sent.append((topic, key, message))
        text = getattr(message, "response", "")
        return Future(TimeoutError("no ack") if self.fail and self.fail in text else None)


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    return path


def test_a_file_is_imported_line_by_line_with_every_rejection_numbered(tmp_path):
    path = write(
        tmp_path,
        [
            hh() + "\n",
            "\n",  # blank: neither imported nor rejected
            '{"chosen": 1}\n',
            hh(chosen="A pear.") + "\n",
            hh() + "\n",  # the same as line 1
            b'{"chosen": "\xff"}\n',
            hh(rejected="A pear.", chosen="A pear.") + "\n",
            hh(chosen="A plum."),  # no final newline
        ],
    )
    publisher = FakePublisher()
    report = import_file("preferences", path, "hh", PROMPTS, publisher)
    assert (report.lines, report.valid, report.imported, report.events) == (7, 3, 3, 9)
    assert report.rejected == 4 and report.exit_code == EXIT_OK
    assert [(r.line, r.reason) for r in report.examples] == [
        (3, '"chosen" must be a string, got int'),
        (5, "same content as line 1"),
        (6, "not UTF-8 (byte 12)"),
        (7, "chosen and rejected are the same answer"),
    ]
    assert [topic for topic, _, _ in publisher.sent[:3]] == [bus.GENERATIONS] * 2 + [bus.FEEDBACK]
    summary = "\n".join(report.summary())
    assert "7 lines read, 3 imported (9 events acknowledged), 4 rejected" in summary
    assert "  line 6: not UTF-8 (byte 12)" in summary


def test_only_the_first_rejections_are_kept_but_all_are_counted(tmp_path):
    path = write(tmp_path, [f'{{"prompt": {i}}}\n' for i in range(30)])
    report = import_file("demonstrations", path, "demos", PROMPTS, FakePublisher(), keep=3)
    assert report.rejected == 30 and [r.line for r in report.examples] == [1, 2, 3]
    assert report.summary()[-1] == "  ... and 27 more rejected lines (--show 0 lists them all)"
    assert report.exit_code == EXIT_NOTHING_IMPORTED


def test_a_dry_run_validates_without_publishing(tmp_path):
    path = write(tmp_path, [demo() + "\n", demo(prompt="Say bye") + "\n", "oops\n"])
    report = import_file("demonstrations", path, "demos", PROMPTS, publisher=None)
    assert (report.valid, report.imported, report.rejected) == (2, 0, 1)
    assert report.exit_code == EXIT_OK and "dry run: nothing published" in report.summary()[0]
    empty = import_file("demonstrations", write(tmp_path, ["\n"]), "demos", PROMPTS, None)
    assert empty.exit_code == EXIT_NOTHING_IMPORTED


def test_lines_the_broker_did_not_acknowledge_are_not_counted_and_reading_stops(tmp_path):
    lines = [hh(chosen=f"Answer {i}.") + "\n" for i in range(6)]
    lines[2] = hh(chosen="Answer 2, fail.") + "\n"
    path = write(tmp_path, lines)
    report = import_file("preferences", path, "hh", PROMPTS, FakePublisher(fail="fail"), window=1)
    # Line 3's ack failed while line 4 was in flight; line 4 was still acknowledged; reading
    # stopped before line 5.
    assert (report.imported, report.unconfirmed, report.stopped_at) == (3, 1, 5)
    assert "no ack" in report.broker_error and report.exit_code == EXIT_UNCONFIRMED
    assert "Running the same command again is safe" in report.summary()[-1]


def test_a_broker_refusing_from_the_start_imports_nothing(tmp_path):
    path = write(tmp_path, [demo(prompt=f"Prompt {i}") + "\n" for i in range(3)])
    report = import_file("demonstrations", path, "d", PROMPTS, FakePublisher(refuse_after=0))
    assert (report.imported, report.unconfirmed, report.stopped_at) == (0, 1, 2)
    assert report.exit_code == EXIT_NOTHING_IMPORTED


def test_preferences_are_plain_data():
    # The parsed form can be built by hand, e.g. from another dataset layout.
    preference = Preference((("user", "Hi"),), "Hello!", "Go away.")
    events = preference_events(preference, "manual", PROMPTS, LIMITS)
    assert [e.message.response for e in events[:2]] == ["Go away.", "Hello!"]


def test_imported_ids_are_not_generation_ids_and_key_by_themselves():
    """Imported generations carry no signed id: the feedback service refuses them, and their
    events are keyed as `partition_key` keys them (by the id itself)."""
    from rlhf.ids import GenerationIdSigner, InvalidGenerationId, partition_key

    imported = "import:hh:0123abcd:chosen"
    assert partition_key(imported) == imported
    with pytest.raises(InvalidGenerationId):
        GenerationIdSigner(b"k" * 32).verify(imported)

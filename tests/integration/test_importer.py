"""Offline import on a real broker: `rlhf import` puts a file's lines on the live
topics, keyed so the join works across partitions; importing the file again repeats the same ids;
and the reward stage's `FeedbackExamples` and the sft stage's `CorrectionIntake` turn the consumed
records into the file's preference pairs and demonstrations, once each, in any order Kafka may
deliver them."""

import json
import random
from collections import Counter, defaultdict

import pytest

from rlhf import bus, cli
from rlhf.models import load_tokenizer
from rlhf.training.reward import FeedbackExamples, Pair
from rlhf.training.sft import read_demonstrations
from rlhf.v1 import events_pb2
from services.trainer.sft.loop import CorrectionIntake
from tests.conftest import consume_all

PAIRS = [
    ("What is the capital of France?", "Paris.", "I don't know."),
    ("Say something kind.", "You are doing great!", "No."),
    ("Is the sky green?", "No, it is usually blue.", "Yes, always."),
]
MULTI_TURN = (
    "\n\nHuman: Recommend a fruit.\n\nAssistant: An apple.\n\nHuman: Another one?",
    "A pear.",
    "An apple.",
)


def hh(conversation, chosen, rejected):
    return json.dumps(
        {
            "chosen": f"{conversation}\n\nAssistant: {chosen}",
            "rejected": f"{conversation}\n\nAssistant: {rejected}",
        }
    )


@pytest.fixture(scope="module")
def encode(cache_dir):
    tokenizer = load_tokenizer(cache_dir)
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def imported(broker, name):
    """This dataset's records on both topics (the session's broker holds other tests' too)."""
    prefix = f"import:{name}:"
    records = consume_all(broker.bootstrap, bus.GENERATIONS, events_pb2.GenerationEvent)
    records += consume_all(broker.bootstrap, bus.FEEDBACK, events_pb2.FeedbackEvent)
    return [r for r in records if r.key and r.key.startswith(prefix)]


def run_import(kind, path, name, broker, capsys):
    code = cli.main(["import", kind, str(path), "--name", name, "--kafka", broker.bootstrap])
    return code, capsys.readouterr().out


def kafka_orders(records, seeds=range(5)):
    """Orders a consumer may see: offsets kept within each (topic, partition), partitions and
    topics interleaved arbitrarily; the first puts all feedback before any generation."""
    queues = defaultdict(list)
    for record in sorted(records, key=lambda r: r.offset):
        queues[(record.topic, record.partition)].append(record)
    worst = sorted(queues, key=lambda tp: (tp[0] != bus.FEEDBACK, -tp[1]))
    yield [r for tp in worst for r in queues[tp]]
    for seed in seeds:
        rng, heads = random.Random(seed), {tp: list(q) for tp, q in queues.items()}
        order = []
        while heads:
            tp = rng.choice(sorted(heads))
            order.append(heads[tp].pop(0))
            if not heads[tp]:
                del heads[tp]
        yield order


def by_line(records):
    """Records grouped by record key: one group per imported line."""
    groups = defaultdict(list)
    for record in records:
        groups[record.key].append(record)
    return groups


def ids_of(records):
    """Every record's id: generation ids and feedback event ids, sorted."""
    return sorted(
        r.message.event_id if r.topic == bus.FEEDBACK else r.message.generation_id for r in records
    )


def test_preferences_reach_the_topics_and_become_the_reward_stages_pairs(broker, tmp_path, capsys):
    name = "hh-test"  # fixed: ids, so partitions, are the same in every run
    lines = [hh(f"\n\nHuman: {q}", good, bad) for q, good, bad in PAIRS]
    lines.insert(1, json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Same", "rejected": "Same"}))
    lines.append(hh(*MULTI_TURN))
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n")

    code, out = run_import("preferences", path, name, broker, capsys)
    assert code == 0
    assert "5 lines read, 4 imported (12 events acknowledged), 1 rejected" in out
    assert "line 2: rejected: expected" in out

    # (a) Per line: rejected answer, chosen answer, ranking; one key (the ranking's generation
    # id), so one partition number on both topics, rejected before chosen.
    first = imported(broker, name)
    groups = by_line(first)
    assert len(groups) == 4 and all(len(g) == 3 for g in groups.values())
    for key, group in groups.items():
        [feedback] = [r.message for r in group if r.topic == bus.FEEDBACK]
        chosen_id, rejected_id = feedback.feedback.ranking.generation_ids
        assert key == feedback.feedback.generation_id == chosen_id
        assert feedback.tenant == f"import:{name}" and feedback.policy_version == 0
        generations = sorted(
            (r for r in group if r.topic == bus.GENERATIONS), key=lambda r: r.offset
        )
        assert [r.message.generation_id for r in generations] == [rejected_id, chosen_id]
        assert len({r.partition for r in group}) == 1
        assert {r.message.finish_reason for r in generations} == {"import"}
    assert len({r.partition for r in first}) > 1  # the lines do spread over partitions

    # (b) The same file again: the same ids, published a second time.
    code, out = run_import("preferences", path, name, broker, capsys)
    assert code == 0 and "4 imported" in out
    both = imported(broker, name)
    assert len(both) == 2 * len(first)
    assert ids_of(both) == sorted(ids_of(first) * 2)

    # (c) The reward stage's examples: each pair once, whatever the delivery order. (With each
    # generation keyed by its own id, some orders would join a ranking before its rejected
    # answer was seen, and lose the pair.)
    _, good, bad = MULTI_TURN
    multi_turn_prompt = "user: Recommend a fruit.\nassistant: An apple.\nuser: Another one?"
    expected = Counter([Pair(q, good, bad) for q, good, bad in PAIRS])
    expected[Pair(multi_turn_prompt, good, bad)] += 1
    for order in kafka_orders(both):
        examples = FeedbackExamples()
        labelled = []
        for record in order:
            if record.topic == bus.GENERATIONS:
                labelled += examples.add_generation(record.message)
            else:
                labelled += examples.add_feedback(record.message)
        assert Counter(item.example for item in labelled) == expected
        assert examples.unresolved_ranked == 0


def test_demonstrations_reach_the_topics_and_become_the_sft_stages_demonstrations(
    broker, tmp_path, capsys, encode
):
    name = "demos-test"
    good = [
        {"prompt": "Say hi", "response": "Hi! Lovely to see you."},
        {"prompt": "Count to three", "response": "One, two, three."},
        {"prompt": "Name a colour", "response": "Blue."},
    ]
    lines = [json.dumps(item) for item in good]
    lines[1:1] = ['{"prompt": "Say hi", "response": "   "}', "not json"]
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(lines) + "\n")

    code, out = run_import("demonstrations", path, name, broker, capsys)
    assert code == 0 and "5 lines read, 3 imported (6 events acknowledged), 2 rejected" in out
    assert 'line 2: "response" is empty' in out and "line 3: not JSON" in out

    # (a) A generation for the prompt and the correction, keyed by the generation id.
    first = imported(broker, name)
    for key, group in by_line(first).items():
        [generation] = [r.message for r in group if r.topic == bus.GENERATIONS]
        [feedback] = [r.message for r in group if r.topic == bus.FEEDBACK]
        assert key == generation.generation_id == feedback.feedback.generation_id
        assert feedback.feedback.WhichOneof("signal") == "correction"
        assert len({r.partition for r in group}) == 1

    # (b) Importing again repeats the ids.
    code, _ = run_import("demonstrations", path, name, broker, capsys)
    assert code == 0
    both = imported(broker, name)
    assert len(both) == 2 * len(first) == 12
    assert ids_of(both) == sorted(ids_of(first) * 2)

    # (c) The sft stage's intake makes exactly the file's demonstrations, once each.
    from_file, rejected = read_demonstrations(path, encode, encode, 512)
    assert [r.line for r in rejected] == [2, 3]
    for order in kafka_orders(both):
        intake = CorrectionIntake(consumer=None, encode=encode, max_tokens=512)
        for record in order:
            intake.handle(record)
        assert Counter(intake.demos) == Counter(from_file)

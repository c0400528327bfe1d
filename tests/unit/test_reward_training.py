"""The reward training loop without I/O: examples from feedback, splits, rounds and the gate."""

import random

import pytest
import torch

from rlhf.algorithms.reward import placements, roc_auc
from rlhf.models import TINY, load_reward_backbone, reward_normalisation
from rlhf.scoring import reward_prompt
from rlhf.training import Interrupted
from rlhf.training.reward import (
    DataSnapshot,
    Examples,
    FeedbackDataset,
    FeedbackExamples,
    Labelled,
    Pair,
    Rated,
    ReferenceSamples,
    RewardTrainer,
    freeze_lower_layers,
    gate,
    in_heldout,
)
from rlhf.training.reward_config import RewardTrainingConfig
from rlhf.v1 import common_pb2, events_pb2
from services.simulated_users.synthetic import feedback_event, generation_event

RNG = random.Random(0)


def generation(response, prompt="How was your weekend?", version=0):
    return generation_event(prompt, response, version, RNG)


# -- what the reward model is asked -----------------------------------------------------------


def test_reward_prompt_is_the_users_words():
    event = events_pb2.GenerationEvent(
        prompt="<|im_start|>system\n...<|im_end|>",
        messages=[
            common_pb2.ChatMessage(role="system", content="Be nice."),
            common_pb2.ChatMessage(role="user", content="Hi?"),
        ],
    )
    assert reward_prompt(event) == "Hi?"


def test_a_longer_chat_keeps_its_roles_and_a_plain_prompt_is_itself():
    chat = events_pb2.GenerationEvent(
        messages=[
            common_pb2.ChatMessage(role="user", content="Hi?"),
            common_pb2.ChatMessage(role="assistant", content="Hello."),
            common_pb2.ChatMessage(role="user", content="And?"),
        ]
    )
    assert reward_prompt(chat) == "user: Hi?\nassistant: Hello.\nuser: And?"
    assert reward_prompt(events_pb2.GenerationEvent(prompt="Once upon")) == "Once upon"


# -- feedback to examples ---------------------------------------------------------------------


def test_thumbs_and_scores_become_rated_answers():
    builder = FeedbackExamples()
    good, bad, meh = generation("Lovely!"), generation("Awful."), generation("Fine.")
    for event in (good, bad, meh):
        assert builder.add_generation(event) == []
    up = builder.add_feedback(feedback_event(good, RNG, thumb=events_pb2.THUMB_UP))
    down = builder.add_feedback(feedback_event(bad, RNG, thumb=events_pb2.THUMB_DOWN))
    score = builder.add_feedback(feedback_event(meh, RNG, score=events_pb2.ScalarScore(value=0.25)))
    prompt = "How was your weekend?"
    assert up == [Labelled(good.generation_id, Rated(prompt, "Lovely!", 1.0))]
    assert down == [Labelled(bad.generation_id, Rated(prompt, "Awful.", 0.0))]
    assert score == [Labelled(meh.generation_id, Rated(prompt, "Fine.", 0.25))]


def test_feedback_that_arrives_first_waits_for_its_generation():
    builder = FeedbackExamples()
    event = generation("Lovely!")
    assert builder.add_feedback(feedback_event(event, RNG, thumb=events_pb2.THUMB_UP)) == []
    assert [x.example.target for x in builder.add_generation(event)] == [1.0]


def test_a_correction_beats_the_answer_it_corrects():
    builder = FeedbackExamples()
    event = generation("Awful.")
    builder.add_generation(event)
    labelled = builder.add_feedback(
        feedback_event(event, RNG, correction=events_pb2.Correction(text="Lovely!"))
    )
    assert [x.example for x in labelled] == [Pair("How was your weekend?", "Lovely!", "Awful.")]


def test_a_ranking_gives_every_ordered_pair_of_known_generations():
    builder = FeedbackExamples()
    best, middle, worst = generation("A"), generation("B"), generation("C")
    for event in (best, middle, worst):
        builder.add_generation(event)
    ranking = events_pb2.Ranking(
        generation_ids=[best.generation_id, "unknown", middle.generation_id, worst.generation_id]
    )
    labelled = builder.add_feedback(feedback_event(middle, RNG, ranking=ranking))
    pairs = [(x.example.chosen, x.example.rejected) for x in labelled]
    assert pairs == [("A", "B"), ("A", "C"), ("B", "C")]
    assert {x.key for x in labelled} == {middle.generation_id}
    assert builder.unresolved_ranked == 1


# -- splits and data --------------------------------------------------------------------------


def test_heldout_membership_is_stable_and_close_to_the_fraction():
    keys = [f"generation-{i}" for i in range(5000)]
    chosen = [k for k in keys if in_heldout(k, 0.2)]
    assert 0.18 < len(chosen) / len(keys) < 0.22
    assert chosen == [k for k in keys if in_heldout(k, 0.2)]


def test_dataset_splits_by_key_and_reports_fresh_examples_once():
    dataset = FeedbackDataset(heldout_fraction=0.5)
    items = [Labelled(f"g{i}", Rated("p", f"r{i}", 1.0)) for i in range(40)]
    assert dataset.add(items) == 40
    assert dataset.fresh == 40
    snapshot = dataset.snapshot()
    heldout = {r.response for r in snapshot.heldout.rated}
    assert heldout == {f"r{i}" for i in range(40) if in_heldout(f"g{i}", 0.5)}
    assert len(snapshot.train) + len(snapshot.heldout) == 40
    assert len(snapshot.fresh) == 40
    assert dataset.fresh == 0 and len(dataset.snapshot().fresh) == 0


def test_dataset_keeps_the_newest_when_full():
    dataset = FeedbackDataset(heldout_fraction=0.01, max_train=3)
    dataset.add(Labelled(f"g{i}", Rated("p", f"r{i}", 1.0)) for i in range(10))
    kept = [r.response for r in dataset.snapshot().train.rated]
    assert len(kept) == 3 and kept[-1] in ("r9", "r8", "r7", "r6")


def test_reference_samples_keep_the_oldest_policy_version_only():
    reference = ReferenceSamples(capacity=4, seed=0)
    for i in range(3):
        reference.add(generation(f"new {i}", version=2))
    assert reference.policy_version == 2 and len(reference.samples()) == 3
    for i in range(10):
        reference.add(generation(f"base {i}", version=0))
    reference.add(generation("newer", version=5))
    samples = reference.samples()
    assert reference.policy_version == 0
    assert len(samples) == 4 and all(r.startswith("base") for _, r in samples)


# -- the gate ---------------------------------------------------------------------------------


def _thumbs(scores, liked):
    """Placements of thumbs only: `scores` with `liked` marking the thumbs-up."""
    empty = torch.zeros(0)
    return placements(empty, empty, torch.tensor(scores), torch.tensor(liked))


# Twenty thumbs, eight up: ranked perfectly, and with every other one moved 0.7 towards the
# other side (AUC 0.75).
LIKED = [True, False, False] * 6 + [True, True]
PERFECT = [float(up) + 0.01 * i for i, up in enumerate(LIKED)]
GOOD = [
    float(up) + 0.01 * i + (0.7 if i % 2 == 0 else 0.0) * (-1) ** up for i, up in enumerate(LIKED)
]


def test_the_gate_publishes_what_clearly_ranks_better_than_chance():
    assert gate(_thumbs(PERFECT, LIKED), None, 0.9, 0.0, 16)[0] == []
    reasons, stats = gate(_thumbs(GOOD, LIKED), None, 0.9, 0.0, 16)
    assert reasons == [] and stats["gate/vs_chance_lower"] > 0
    assert stats["gate/ranking"] == pytest.approx(roc_auc(torch.tensor(GOOD), torch.tensor(LIKED)))
    # Scores that ignore the thumbs (every one alike, or reversed) are refused.
    [reason] = gate(_thumbs([0.0] * 20, LIKED), None, 0.9, 0.0, 16)[0]
    assert reason.startswith("does not rank answers better than chance with 90% confidence")
    assert gate(_thumbs([-x for x in PERFECT], LIKED), None, 0.9, 0.0, 16)[0]
    # Too few held-out examples is a reason of its own, whatever the numbers.
    assert gate(_thumbs(PERFECT[:12], LIKED[:12]), None, 0.9, 0.0, 16)[0] == [
        "only 12 held-out examples (at least 16 are needed)"
    ]


def test_the_gate_refuses_what_ranks_clearly_worse_than_the_served_model():
    served, candidate = _thumbs(PERFECT, LIKED), _thumbs(GOOD, LIKED)
    reasons, stats = gate(candidate, served, 0.9, 0.0, 16)
    assert len(reasons) == 1 and " vs served " in reasons[0], reasons
    assert stats["gate/ranking_served"] == pytest.approx(1.0)
    assert stats["gate/vs_served_upper"] < 0
    # Within the tolerance, or not clearly worse (one thumb placed differently), it is published.
    assert gate(candidate, served, 0.9, 0.2, 16)[0] == []
    nearly = list(PERFECT)
    nearly[0] = -1.0  # the first thumbs-up now scores below every thumbs-down
    assert gate(_thumbs(nearly, LIKED), served, 0.9, 0.0, 16)[0] == []


def test_the_gate_is_wrong_about_chance_as_rarely_as_its_confidence_says():
    """Scores unrelated to the thumbs pass the chance test about 10% of the time at 90%
    confidence (44 of these 400 draws; a t bound on the pooled placements, which ignores that a
    few thumbs-up carry half the AUC's variance, passed 108); scores that order them at AUC 0.76
    (thumbs-up shifted by one standard deviation) on 60 thumbs pass (391)."""
    generator = torch.Generator().manual_seed(0)
    passed = {0.0: 0, 1.0: 0}
    trials = 400
    for shift in passed:
        for _ in range(trials):
            liked = torch.rand(60, generator=generator) < 0.28
            scores = torch.randn(60, generator=generator) + shift * liked
            placed = placements(torch.zeros(0), torch.zeros(0), scores, liked)
            passed[shift] += not gate(placed, None, 0.9, 0.0, 16)[0]
    assert 0.05 < passed[0.0] / trials < 0.15, passed
    assert passed[1.0] / trials > 0.8, passed


def test_a_few_unanimous_pairs_do_not_make_chance_pass_more_often():
    """A part whose few examples all agree has no sample variance (a few held-out pairs all
    right, as early make up rounds have). With 4 random pairs beside 36 random thumbs, chance
    still passes about 10% of the time at 90% confidence (44 of these 400 draws)."""
    generator = torch.Generator().manual_seed(1)
    passed, trials = 0, 400
    for _ in range(trials):
        liked = torch.rand(36, generator=generator) < 0.28
        scores = torch.randn(36, generator=generator)
        chosen, rejected = torch.randn(2, 4, generator=generator)
        placed = placements(chosen, rejected, scores, liked)
        passed += not gate(placed, None, 0.9, 0.0, 16)[0]
    assert 0.05 < passed / trials < 0.15, passed


def test_a_round_takes_fewer_steps_on_little_data():
    trainer = _trainer(steps_per_round=80, epochs_per_round=4.0, batch_size=16)
    assert trainer.steps_for(10) == 3 and trainer.steps_for(100) == 25
    assert trainer.steps_for(1000) == 80 and trainer.steps_for(0) == 1


# -- training rounds on the tiny random model -------------------------------------------------

POSITIVE = ["great", "lovely", "wonderful", "fantastic", "delightful", "amazing"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "miserable", "boring"]


def _examples(seed, flip=False, count=48):
    rng = random.Random(seed)
    examples = Examples()
    for _ in range(count):
        good = f"it was {rng.choice(POSITIVE)}"
        bad = f"it was {rng.choice(NEGATIVE)}"
        if flip:
            good, bad = bad, good
        examples.add(Pair("How was it?", good, bad))
        examples.add(Rated("How was it?", good, 1.0))
        examples.add(Rated("How was it?", bad, 0.0))
    return examples


def _trainer(**overrides):
    model, tokenizer = load_reward_backbone(TINY, seed=0)
    settings = {
        "steps_per_round": 60,
        "epochs_per_round": 100.0,  # the tiny model needs its 60 steps on these few examples
        "learning_rate": 1e-3,
        "trainable_layers": -1,
        "min_heldout": 10,
        **overrides,
    }
    return RewardTrainer(model, tokenizer, RewardTrainingConfig(**settings), max_tokens=32)


REFERENCE = [("How was it?", f"it was {w}") for w in POSITIVE + NEGATIVE + ["ok", "fine"]]


def test_a_round_on_consistent_feedback_is_promoted_and_normalised():
    trainer = _trainer()
    data = DataSnapshot(train=_examples(1), heldout=_examples(2, count=16), fresh=Examples())
    result = trainer.round(data, REFERENCE)
    assert result.promoted, result.reasons
    assert result.candidate["pairwise_accuracy"] >= 0.9
    assert result.candidate["pairwise_accuracy"] > result.incumbent["pairwise_accuracy"] + 0.2
    shift, scale = reward_normalisation(trainer.model)
    assert (shift, scale) == result.normalisation
    raw = trainer.raw_scores(trainer.model, *zip(*REFERENCE, strict=True))
    served = (raw - shift) / scale
    assert served.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert served.std(correction=0).item() == pytest.approx(1.0, abs=1e-3)
    # The promoted model is the new incumbent: identical scores.
    assert torch.equal(raw, trainer.raw_scores(trainer.incumbent, *zip(*REFERENCE, strict=True)))


def test_a_round_on_poisoned_feedback_is_refused_and_rolled_back():
    trainer = _trainer()
    heldout = _examples(2, count=16)
    first = trainer.round(DataSnapshot(_examples(1), heldout, Examples()), REFERENCE)
    assert first.promoted
    served_state = {k: v.clone() for k, v in trainer.incumbent.state_dict().items()}
    served_normalisation = reward_normalisation(trainer.incumbent)

    # Feedback that contradicts what users said before (a buggy client flipping thumbs): it
    # disagrees with the same users' held-out feedback, so the model trained on it regresses.
    fresh = _examples(3, flip=True, count=96)
    second = trainer.round(DataSnapshot(fresh, heldout, fresh), REFERENCE)
    assert not second.promoted
    assert any(" vs served " in r for r in second.reasons), second.reasons
    assert second.candidate["pairwise_accuracy"] < second.incumbent["pairwise_accuracy"]
    # The served model judged the fresh (flipped) feedback: it disagrees with it.
    assert second.agreement["pairwise_accuracy"] < 0.2
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, served_state[name]), name
    assert reward_normalisation(trainer.model) == served_normalisation


@pytest.mark.parametrize("stop_after", [0, 5, 60])  # before the first step, mid-way, at the end
def test_a_stop_gives_the_round_up_and_leaves_the_served_model(stop_after):
    """A stopping stage's round ends at the next step (or before the held-out evaluation): the
    candidate goes back to the served model and the round is not counted, so the next round
    (after the restart, on the same examples) is the same round again."""
    trainer = _trainer()
    data = DataSnapshot(train=_examples(1), heldout=_examples(2, count=16), fresh=Examples())
    served = {k: v.clone() for k, v in trainer.incumbent.state_dict().items()}
    asked = []

    def stopping():
        asked.append(True)
        return len(asked) > stop_after

    with pytest.raises(Interrupted, match="stopped "):
        trainer.round(data, REFERENCE, stopping)
    assert trainer.steps == stop_after and trainer.rounds == 0
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, served[name]), name
    assert reward_normalisation(trainer.model) == reward_normalisation(trainer.incumbent)
    assert trainer.round(data, REFERENCE).promoted and trainer.rounds == 1


def test_too_small_a_heldout_set_never_publishes():
    trainer = _trainer(min_heldout=100, steps_per_round=1)
    result = trainer.round(DataSnapshot(_examples(1), _examples(2, count=8), Examples()), [])
    assert not result.promoted
    assert result.reasons[0] == "only 24 held-out examples (at least 100 are needed)"


def test_training_steps_reduce_the_loss_on_what_they_see():
    trainer = _trainer()
    batch = _examples(1, count=8)
    first = trainer.step(batch)["loss/total"]
    for _ in range(30):
        last = trainer.step(batch)["loss/total"]
    assert last < 0.5 * first


def test_freezing_keeps_only_the_top_layers_pooler_and_head_trainable():
    model, _ = load_reward_backbone(TINY)
    freeze_lower_layers(model, trainable_layers=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        name.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier."))
        for name in trainable
    )
    assert any(name.startswith("bert.encoder.layer.1.") for name in trainable)
    assert any(name.startswith("classifier.") for name in trainable)

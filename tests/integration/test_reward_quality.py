"""The real reward backbone (MiniLM) learns what the simulated users reward.

The users rate templated answers to their own prompts with VADER sentiment (thumbs) and rank
pairs of answers; one training round (80 steps of 16 examples, top two encoder layers and the
head trained) must order held-out pairs like the users at least 85% of the time, far above the
untrained head. About 25 s of CPU.
"""

from rlhf.models import MINILM, load_reward_backbone
from rlhf.training.reward import (
    DataSnapshot,
    Examples,
    FeedbackDataset,
    FeedbackExamples,
    ReferenceSamples,
    RewardTrainer,
)
from rlhf.training.reward_config import RewardTrainingConfig
from rlhf.v1 import events_pb2
from services.simulated_users.synthetic import feedback_stream


def _collect(rounds, seed):
    examples, dataset = FeedbackExamples(), FeedbackDataset(heldout_fraction=0.25)
    reference = ReferenceSamples(capacity=128, seed=seed)
    for event in feedback_stream(rounds, seed=seed):
        if isinstance(event, events_pb2.GenerationEvent):
            reference.add(event)
            dataset.add(examples.add_generation(event))
        else:
            dataset.add(examples.add_feedback(event))
    return dataset.snapshot(), reference.samples()


def test_minilm_learns_the_simulated_users_preferences():
    data, reference = _collect(rounds=600, seed=0)
    assert len(data.heldout.pairs) >= 100 and len(data.heldout.rated) >= 250
    model, tokenizer = load_reward_backbone(MINILM, seed=0)
    trainer = RewardTrainer(model, tokenizer, RewardTrainingConfig(seed=0), max_tokens=64)
    result = trainer.round(DataSnapshot(data.train, data.heldout, Examples()), reference)

    trained, untrained = result.candidate, result.incumbent
    assert trained["pairwise_accuracy"] >= 0.85, trained
    assert trained["pairwise_accuracy"] - untrained["pairwise_accuracy"] >= 0.25, untrained
    assert trained["thumbs_auc"] >= 0.9 and trained["brier"] < untrained["brier"]
    assert result.promoted

    # Wording outside the answer templates: a clear preference still comes through.
    good = trainer.raw_scores(trainer.model, ["How do you feel about winter?"], ["I love winter!"])
    bad = trainer.raw_scores(trainer.model, ["How do you feel about winter?"], ["Winter is awful."])
    assert good.item() > bad.item()

"""SFT: answer-only labels with EOS, a loss that goes down, and demonstrations files whose bad
lines are reported by number."""

import json

import pytest
import torch

from rlhf.models import TINY, load_base_policy
from rlhf.training import Interrupted
from rlhf.training.sft import (
    IGNORE,
    Demonstration,
    SFTConfig,
    SFTLearner,
    make_demonstration,
    read_demonstrations,
    sft_batch,
    sft_loss,
)

PAD, EOS = 0, 9


def test_batch_left_pads_prompts_right_pads_answers_and_labels_only_answers_and_eos():
    demos = [Demonstration((1, 2), (3,)), Demonstration((4,), (5, 6))]
    ids, mask, labels = sft_batch(demos, PAD, EOS)
    assert ids.tolist() == [[1, 2, 3, 9, 0], [0, 4, 5, 6, 9]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert labels.tolist() == [[IGNORE, IGNORE, 3, 9, IGNORE], [IGNORE, IGNORE, 5, 6, 9]]


def test_the_loss_is_the_mean_cross_entropy_of_answer_tokens_only():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            logits = torch.zeros(*input_ids.shape, 10)
            logits[..., 3] = 1.0  # token 3 a little more likely everywhere
            return type("Out", (), {"logits": logits})()

    ids, mask, labels = sft_batch([Demonstration((1, 2), (3,))], PAD, EOS)
    loss = sft_loss(Uniform(), ids, mask, labels)
    log_z = torch.logsumexp(torch.tensor([1.0] + [0.0] * 9), 0)
    # Two answer positions: token 3 (logit 1) and EOS (logit 0).
    assert loss.item() == pytest.approx(((log_z - 1) + log_z).item() / 2)


def test_training_on_demonstrations_lowers_their_loss(cache_dir):
    torch.manual_seed(0)
    policy = load_base_policy(TINY, cache_dir)
    demos = [Demonstration((5, 6, 7), (40, 41, 42, 43)), Demonstration((8, 9), (44, 45))]
    learner = SFTLearner(policy, PAD, 2, SFTConfig(learning_rate=1e-2, batch_size=2, epochs=20))
    stats = learner.train(demos)
    # Measured: 10.9 -> 0.17; memorising two answers must at least divide the loss by 10.
    assert stats["sft/loss"] < 0.1 * stats["sft/loss_first_epoch"]
    assert learner.steps == 20 and not policy.training


def test_a_stop_gives_training_up_between_steps(cache_dir):
    """A stopping stage asks between steps: the third question ends the round after two."""
    policy = load_base_policy(TINY, cache_dir)
    demos = [Demonstration((5, 6, 7), (40, 41)), Demonstration((8, 9), (44, 45))]
    learner = SFTLearner(policy, PAD, 2, SFTConfig(batch_size=1, epochs=3))
    asked = []

    def stopping():
        asked.append(len(asked))
        return len(asked) > 2

    with pytest.raises(Interrupted, match="stopped after 2 of 6 steps"):
        learner.train(demos, stopping)
    assert learner.steps == 2 and len(asked) == 3 and not policy.training


def test_demonstrations_file_reports_bad_lines_by_number(tmp_path):
    path = tmp_path / "demos.jsonl"
    lines = [
        json.dumps({"prompt": "Hi", "response": "Hello there"}),
        "{not json",
        json.dumps({"prompt": "", "response": "x"}),
        "",
        json.dumps(["a list"]),
        json.dumps({"prompt": "Long", "response": "word " * 50}),
        json.dumps({"prompt": "Bye", "response": "See you"}),
    ]
    path.write_text("\n".join(lines) + "\n")

    def encode(text):
        return [ord(c) % 50 + 1 for c in text]

    demos, rejected = read_demonstrations(path, encode, encode, max_tokens=64)
    assert [d.response_ids for d in demos] == [
        tuple(encode("Hello there")),
        tuple(encode("See you")),
    ]
    assert [r.line for r in rejected] == [2, 3, 5, 6]
    assert "prompt" in rejected[1].reason and "64 tokens" in rejected[3].reason


def test_a_demonstration_needs_tokens_on_both_sides():
    with pytest.raises(ValueError):
        make_demonstration([], [1], 10)
    with pytest.raises(ValueError):
        make_demonstration([1], [], 10)


def test_a_chat_prompt_is_encoded_through_the_chat_encoder_and_bad_messages_are_refused(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}], "response": "Hello"}
    lines = [
        good,
        {"messages": [{"role": "robot", "content": "Hi"}], "response": "x"},
        {"messages": [], "response": "x"},
        {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "response": "x"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines))

    def encode_prompt(prompt):
        text = prompt if isinstance(prompt, str) else "|".join(m["content"] for m in prompt) + "|>"
        return [ord(c) for c in text]

    demos, rejected = read_demonstrations(path, encode_prompt, lambda t: [ord(c) for c in t], 64)
    assert [d.prompt_ids for d in demos] == [tuple(ord(c) for c in "Hi|>")]
    assert [r.line for r in rejected] == [2, 3, 4]
    assert "role" in rejected[0].reason and "exactly one" in rejected[2].reason

"""Supervised fine-tuning on demonstrations (a prompt and the answer a user wrote instead).

Pure tensor code plus a small learner: the loss is next-token cross-entropy on the answer's tokens
only (the prompt and the padding are masked out), the answer ends with EOS so the policy learns
to stop, and positions count only real tokens, as in the PPO forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf.models import CHAT_ROLES
from rlhf.training import Interrupted, Stopping, never
from rlhf.training.sft_config import SFTConfig

IGNORE = -100  # label value cross_entropy skips
Encoder = Callable[[str], list[int]]
# A prompt: plain text, or chat messages ({"role", "content"}) the policy's template renders.
Prompt = str | list[dict[str, str]]
PromptEncoder = Callable[[Prompt], list[int]]


@dataclass(frozen=True)
class Demonstration:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # without the EOS; sft_batch appends it


def sft_batch(
    demos: Sequence[Demonstration], pad_id: int, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), prompts left-padded and answers right-padded.

    labels[t] is the token at t when t is an answer token (EOS included), else IGNORE; the model
    is trained to predict it from position t-1 (the shift happens in `sft_loss`).
    """
    if not demos:
        raise ValueError("an SFT batch needs at least one demonstration")
    width_p = max(len(d.prompt_ids) for d in demos)
    width_r = max(len(d.response_ids) for d in demos) + 1
    ids, mask, labels = [], [], []
    for demo in demos:
        left = width_p - len(demo.prompt_ids)
        answer = [*demo.response_ids, eos_id]
        right = width_r - len(answer)
        ids.append([pad_id] * left + list(demo.prompt_ids) + answer + [pad_id] * right)
        mask.append([0] * left + [1] * (len(demo.prompt_ids) + len(answer)) + [0] * right)
        labels.append([IGNORE] * (left + len(demo.prompt_ids)) + answer + [IGNORE] * right)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def sft_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the batch."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


class SFTLearner:
    def __init__(self, policy: nn.Module, pad_id: int, eos_id: int, config: SFTConfig) -> None:
        self.policy = policy
        self.pad_id, self.eos_id = pad_id, eos_id
        self.config = config
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=config.learning_rate)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.steps = 0

    def train(self, demos: Sequence[Demonstration], stopping: Stopping = never) -> dict[str, float]:
        """`epochs` shuffled passes over `demos`; returns the mean loss of the first and last
        pass, so a caller sees whether it went down. `Interrupted` if `stopping()` before a
        step (the steps taken stay in the policy)."""
        self.policy.train()
        losses: list[float] = []
        steps = self.config.epochs * -(-len(demos) // self.config.batch_size)
        done = 0
        for _ in range(self.config.epochs):
            order = torch.randperm(len(demos), generator=self.shuffle).tolist()
            epoch = []
            for start in range(0, len(order), self.config.batch_size):
                if stopping():
                    self.policy.eval()
                    raise Interrupted(f"stopped after {done} of {steps} steps")
                done += 1
                chunk = [demos[i] for i in order[start : start + self.config.batch_size]]
                epoch.append(self._step(chunk))
            losses.append(sum(epoch) / len(epoch))
        self.policy.eval()
        return {"sft/loss_first_epoch": losses[0], "sft/loss": losses[-1]}

    def _step(self, demos: Sequence[Demonstration]) -> float:
        loss = sft_loss(self.policy, *sft_batch(demos, self.pad_id, self.eos_id))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        return loss.item()


@dataclass(frozen=True)
class RejectedLine:
    line: int
    reason: str


def read_demonstrations(
    path: Path, encode_prompt: PromptEncoder, encode_answer: Encoder, max_tokens: int
) -> tuple[list[Demonstration], list[RejectedLine]]:
    """Demonstrations from a JSONL file of {"prompt": str, "response": str} objects, or
    {"messages": [{"role", "content"}, ...], "response": str} for chats (encoded with the chat
    template, as the generation service does, so SFT trains on the prompts users send).

    Bad lines are reported (line number and reason), not fatal: one typo must not discard a
    dataset, and the caller decides what to print.
    """
    demos, rejected = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                demos.append(
                    _demonstration(json.loads(line), encode_prompt, encode_answer, max_tokens)
                )
            except (ValueError, TypeError) as exc:
                rejected.append(RejectedLine(number, str(exc)))
    return demos, rejected


def _demonstration(
    item: object, encode_prompt: PromptEncoder, encode_answer: Encoder, max_tokens: int
) -> Demonstration:
    if not isinstance(item, dict):
        raise ValueError("expected a JSON object")
    prompt, response = _prompt(item), item.get("response")
    if not isinstance(response, str) or not response.strip():
        raise ValueError('"response" must be a non-empty string')
    return make_demonstration(encode_prompt(prompt), encode_answer(response), max_tokens)


def _prompt(item: dict) -> Prompt:
    if ("prompt" in item) == ("messages" in item):
        raise ValueError('give exactly one of "prompt" and "messages"')
    if "prompt" in item:
        prompt = item["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError('"prompt" must be a non-empty string')
        return prompt
    messages = item["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise ValueError(f'each message needs a "role" in {CHAT_ROLES}')
        if not isinstance(message.get("content"), str):
            raise ValueError('each message needs a "content" string')
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def make_demonstration(
    prompt_ids: Iterable[int], response_ids: Iterable[int], max_tokens: int
) -> Demonstration:
    demo = Demonstration(tuple(prompt_ids), tuple(response_ids))
    if not demo.prompt_ids or not demo.response_ids:
        raise ValueError("prompt and response must both have tokens")
    if len(demo.prompt_ids) + len(demo.response_ids) + 1 > max_tokens:
        raise ValueError(f"longer than {max_tokens} tokens")
    return demo

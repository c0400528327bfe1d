"""The PPO learner behind the online trainer: rollout, score, update, checkpoint contents.

It owns the trainable policy, its value head, the frozen reference and the optimizer. Scoring is
injected (the trainer service passes a reward-service client), so this file does no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import decoding
from rlhf.training.ppo import PPOConfig, ValueHead, build_rollout, ppo_step

# (prompts, responses) -> one scalar per pair
Scorer = Callable[[list[str], list[str]], list[float]]


@dataclass(frozen=True)
class RolloutSettings:
    max_new_tokens: int = 48
    seed: int = 0


class PPOLearner:
    def __init__(
        self,
        policy: PreTrainedModel,
        reference: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: PPOConfig,
        rollout: RolloutSettings,
    ) -> None:
        self.policy = policy
        self.reference = reference.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.rollout_settings = rollout
        self.value_head = ValueHead(policy.config.hidden_size)
        params = [*policy.parameters(), *self.value_head.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        self.kl_controller = config.make_kl_controller()
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.updates = 0
        self._rollout_calls = 0

    def sample(self, prompts: Sequence[Sequence[int]]) -> list[decoding.Completion]:
        """Rollouts from the current policy at the PPO temperature, with no top-k/top-p, so
        the logprobs recomputed in the update are the sampling distribution's own."""
        self._rollout_calls += 1
        base_seed = self.rollout_settings.seed * 1_000_003 + self._rollout_calls * 1_009
        params = [
            decoding.Sampling(
                max_new_tokens=self.rollout_settings.max_new_tokens,
                temperature=self.config.temperature,
                seed=base_seed + row,
            )
            for row in range(len(prompts))
        ]
        self.policy.eval()
        return decoding.generate(
            self.policy,
            prompts,
            params,
            {self.tokenizer.eos_token_id},
            self.tokenizer.pad_token_id,
        )

    def iterate(
        self,
        prompts: Sequence[Sequence[int]],
        score: Scorer,
        prompt_texts: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """One PPO iteration: sample, score, update. Returns TRL-style statistics.

        The reward model sees `prompt_texts` if given (the online trainer passes the user's
        words, as the reward model was trained on), else the decoded prompts.
        """
        completions = self.sample(prompts)
        if prompt_texts is None:
            prompt_texts = self.tokenizer.batch_decode(prompts, skip_special_tokens=True)
        responses = [c.token_ids for c in completions]
        response_texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = score(list(prompt_texts), response_texts)
        rollout = build_rollout(
            prompts, responses, scores, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        )
        stats = ppo_step(
            self.policy,
            self.value_head,
            self.reference,
            self.optimizer,
            rollout,
            self.config,
            self.kl_controller,
            generator=self.shuffle,
        )
        self.updates += 1
        return stats


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A detached copy to use as the reference when the policy starts from the base weights."""
    return copy.deepcopy(model).eval().requires_grad_(False)

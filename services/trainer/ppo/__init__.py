"""The ppo stage: PPO on prompts that received feedback, against the served reward model."""

"""Trainer: joins generations with feedback and runs PPO, publishing policy checkpoints."""

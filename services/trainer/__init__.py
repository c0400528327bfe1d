"""Trainer: joins generations with feedback and trains, one stage per process: PPO (publishing
policy checkpoints) or the reward model (publishing reward checkpoints)."""

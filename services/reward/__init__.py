"""Reward service: scores (prompt, response) pairs with the reward model."""

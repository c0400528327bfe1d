"""Generation service: serves the policy, signs generation ids, follows policy checkpoints."""

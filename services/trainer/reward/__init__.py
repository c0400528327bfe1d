"""The reward stage: the reward model trained from thumbs, rankings, scores and corrections."""

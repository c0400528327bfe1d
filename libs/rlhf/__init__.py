"""Shared code for the platform: config, Kafka bus, checkpoints, models, algorithms."""

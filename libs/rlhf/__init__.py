"""Shared code for the RLHF platform services: config, Kafka bus, checkpoints, models, algorithms."""

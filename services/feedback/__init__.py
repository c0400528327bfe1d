"""Feedback service: authenticates, validates and durably publishes user feedback."""

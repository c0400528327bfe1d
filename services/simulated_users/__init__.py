"""Simulated users: ask for answers and rate them with vaderSentiment, like real users would."""

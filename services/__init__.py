"""The platform services: each a thin shell over libs/rlhf."""

"""Training loops built on the pure algorithms."""

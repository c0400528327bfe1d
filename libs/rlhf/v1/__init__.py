"""Generated from protos/rlhf/v1 by `make protos`."""

"""Pure algorithms over tensors: no I/O, testable on their own."""

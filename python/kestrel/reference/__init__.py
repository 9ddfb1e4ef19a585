"""Plain-PyTorch versions of every op: the test oracles, and the CPU path where no kernel exists."""

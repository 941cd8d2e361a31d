"""Test oracles, public but out of the way: :mod:`.reference` holds the pure-PyTorch twins of
ferrolm's kernels and models (``torch.nn.LSTM``, SDPA, the same parameter names), which the
tests and benchmarks compare ferrolm against on the same weights."""

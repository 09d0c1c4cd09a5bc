"""Plain-PyTorch definitions of every op: the spec, the oracle of the tests, and the fallback."""

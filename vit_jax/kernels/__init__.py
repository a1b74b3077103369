"""Hand-written kernels that XLA's own code generation does not match (loaded only where used)."""

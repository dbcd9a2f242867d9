"""jaxnorm benchmarks: ``python -m benchmarks``."""

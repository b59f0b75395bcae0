"""Benchmark suites: CPU pytest-benchmark files and the one-command GPU suite (``python -m benchmarks.gpu``)."""

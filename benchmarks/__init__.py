"""Speed measurements (not tests), each run as ``python -m benchmarks.<name>`` from the repository root."""

"""Benchmark scripts: ``python -m benchmarks.<name> [--quick] [--json FILE]``. Each prints a table,
writes JSON and compares against a real peer measured in the same run."""

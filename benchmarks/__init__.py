"""Benchmarks run by hand (`python -m benchmarks.<name> --help` from the repository root), outside the installed
packages; their output feeds docs/BENCHMARKS.md and docs/RELIABILITY.md."""

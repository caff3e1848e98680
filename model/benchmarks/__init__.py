"""Benchmarks run by hand (`python -m model.benchmarks.<name> --help`); their output feeds docs/BENCHMARKS.md."""

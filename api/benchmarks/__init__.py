"""Service benchmarks run by hand (`python -m api.benchmarks.<name> --help`); their output feeds docs/RELIABILITY.md."""

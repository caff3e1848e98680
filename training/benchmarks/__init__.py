"""Benchmarks that train recipes over several seeds and write docs/ (see meld_imbalance.py)."""

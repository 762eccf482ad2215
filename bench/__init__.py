"""Benchmarks of metaleg (see docs/benchmarks.md): run each with ``python -m bench.<name>``."""

"""Benchmarks for outboard's devices (run them from the repository root)."""

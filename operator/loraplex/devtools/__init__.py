"""Helpers for tests, the demo and benchmarks; never imported by the operator at run time."""

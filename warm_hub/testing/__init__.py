"""Helpers for tests and benchmarks: tiny checkpoints made at run time (never shipped weights)."""

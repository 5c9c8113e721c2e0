"""Suites for collection are read with the bench's validated reader (`vlmspec.bench.suites`); re-exported here
for code that imported it from the training package."""

from vlmspec.bench.suites import SuiteSample, read_suite

__all__ = ["SuiteSample", "read_suite"]

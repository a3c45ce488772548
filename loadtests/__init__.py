"""Load tests and benchmarks of embedserve."""

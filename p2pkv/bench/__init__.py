"""Benchmarks: ``p2pkv bench directory | transport | ttft | correctness | router | disagg | faults``."""

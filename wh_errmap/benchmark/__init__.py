"""Throughput benchmark: JAX steps, inference and input stream, beside a PyTorch reference."""
from wh_errmap.benchmark.timing import PEAK_FLOPS, STEPS, Result, StepBench, peak_flops

__all__ = ["PEAK_FLOPS", "STEPS", "Result", "StepBench", "peak_flops"]

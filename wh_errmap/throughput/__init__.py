"""Throughput benchmark: JAX training steps, inference, QC latency and the input stream
(`timing`), beside the PyTorch reference of benchmarks/ (`torch_runner`), as a table
(`summary`)."""

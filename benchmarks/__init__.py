"""danet_ops benchmarks: `pytest benchmarks/ --benchmark-only`, then `python -m benchmarks.report`."""

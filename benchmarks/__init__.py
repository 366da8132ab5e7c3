"""Studies and cost measurements: `python -m benchmarks.NAME [--quick] --out DIR`."""

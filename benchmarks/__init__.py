"""The nsn_jax benchmark suite; `python -m benchmarks.run --help`, docs/benchmarks.md.

Nothing here imports jax at package level: `benchmarks.torch_worker` runs in the PyTorch venv
and shares `benchmarks.timing`.
"""

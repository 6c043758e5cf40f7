"""fvkernels' benchmarks (README.md). A package, so that its conftest and modules keep their own names when
pytest collects bench/ together with tests/ (whose modules import `conftest` by name)."""

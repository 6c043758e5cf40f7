"""fvkernels' benchmarks (README.md). A package, like tests/, so that their conftests and modules keep their own
names when pytest collects both."""

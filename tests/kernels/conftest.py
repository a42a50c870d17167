"""Kernel tests import `ofa_ds.kernels`, which setup.py maps to the repository's kernels/ folder. On a machine where
the package is not installed (a bare GPU box running benchmarks/gpu_suite.sh), point the `ofa_ds` package at the
repository root as well, so that `ofa_ds.kernels` resolves to kernels/ without installing anything."""
import os

try:
    import ofa_ds.kernels  # noqa: F401
except ModuleNotFoundError:
    import ofa_ds

    ofa_ds.__path__.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import ofa_ds.kernels  # noqa: F401

"""tests/parallel_worker.py in float64, for BitNet's equivalence tests.

Quantisation is discontinuous: a float difference of one ulp between two layouts (the order of a
tensor-parallel all-reduce) moves an activation across a rounding boundary of the int8 grid once in
~10^5 values in fp32, enough to fail a comparison at 1e-5 after a few steps. In float64 that chance
is ~10^-13, so the layouts can be compared as tightly as the baseline's.
"""
import torch

torch.set_default_dtype(torch.float64)

import parallel_worker  # noqa: E402  (after the default dtype: the worker builds models and data)

if __name__ == "__main__":
    parallel_worker.main()

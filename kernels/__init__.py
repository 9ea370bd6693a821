"""Triton kernels, each beside its plain-PyTorch reference; imported as `megalatent.kernels`."""

"""The parallel engine: rank discovery, the device mesh, parallelize, checkpoints."""

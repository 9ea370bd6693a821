"""Inference: caches, incremental decoding and generation for every model family."""

"""Reusable building blocks: norms, rotary embeddings, attention kinds, MLPs."""

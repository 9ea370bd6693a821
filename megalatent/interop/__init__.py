"""Checkpoints in and out of megalatent: one plain torch file (either way), Hugging Face exports
(convert.py), and packed ternary weights for inference (packed.py). The command lines over these are
tools/convert_checkpoint.py and tools/export_bitnet.py."""

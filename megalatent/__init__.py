"""megalatent: Megatron-style distributed pretraining for the LongNet/YOCO/MH-MoE/BitNet/LatentLM line."""
__version__ = "0.1.0"

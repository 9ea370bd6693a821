"""Data: tokenizer, the embedded stdlib corpus, preprocessing, and Megatron indexed datasets."""
import warnings

# megatron-core warns on import that Transformer Engine and Apex are missing; its data pipeline,
# the only part we use, needs neither.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

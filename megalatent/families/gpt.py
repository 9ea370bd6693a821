"""The LLaMA-style baseline decoder (megalatent/models/decoder.py): the shared trunk, every default."""
from megalatent.config import ModelConfig
from megalatent.families.family import Family
from megalatent.models.decoder import Decoder, dense_decoder_flops_per_token

FAMILY = Family(name="gpt", config=ModelConfig, build=Decoder, flops_per_token=dense_decoder_flops_per_token)

"""The parts of megatron-core we use (its indexed and GPT datasets, the blend builder, the tokenizer metadata),
imported from here, by the functions that use them: importing megatron-core takes a second, which megalatent's
own import does not pay.

megatron/core/__init__.py imports its transformer layers, whose fusion functions are decorated with
torch.compile at import, and that decoration imports torch's inductor: ~1.3 CPU-seconds of every process that
builds data, four fifths of the package's import. Here the package is imported with torch.compile off
(TORCHDYNAMO_DISABLE, which each torch.compile call reads), so those functions, which we never call, stay
undecorated.
"""
import os


def _import_package_with_compile_off() -> None:
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        import megatron.core  # noqa: F401
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


_import_package_with_compile_off()

# After the package, as its submodules: hence E402.
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder  # noqa: E402
from megatron.core.tokenizers import MegatronTokenizer  # noqa: E402

__all__ = ["BlendedMegatronDatasetBuilder", "DType", "GPTDataset", "GPTDatasetConfig", "IndexedDataset",
           "IndexedDatasetBuilder", "MegatronTokenizer"]

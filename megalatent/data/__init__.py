"""Data: tokenizer, the embedded stdlib corpus, preprocessing, and Megatron indexed datasets."""
import os
import sys
import warnings

# megatron-core warns on import that Transformer Engine and Apex are missing; its data pipeline,
# the only part we use, needs neither.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def import_megatron_core() -> None:
    """Import megatron-core's package, for its datasets and tokenizers, with torch.compile off while it loads.

    megatron/core/__init__.py imports its transformer layers, whose fusion functions are decorated with
    torch.compile at import, and that decoration imports torch's inductor: ~1.3 CPU-seconds of every process
    that builds data, four fifths of the package's import. We call none of those functions, which stay
    undecorated. Every import of megatron in megalatent follows a call of this (at once after the first), and
    is made where it is used: importing megatron-core takes a second even so."""
    if "megatron.core" in sys.modules:
        return
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # read by each torch.compile call (torch._dynamo.eval_frame)
    try:
        import megatron.core  # noqa: F401
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before

"""Install megalatent: `pip install -e .` (add `[dev]` for the test suite)."""
from setuptools import find_packages, setup

setup(
    name="megalatent",
    version="0.1.0",
    description="Megatron-style distributed pretraining for LongNet, YOCO, MH-MoE, BitNet b1.58, LatentLM and LongViT",
    python_requires=">=3.10",
    packages=find_packages(include=["megalatent", "megalatent.*"]) + ["megalatent.kernels"],
    # Triton kernels live at the top level beside their references, but import as megalatent.kernels.
    package_dir={"megalatent.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "numpy",  # torch's CPU wheel does not bring it; torch.distributed.pipelining needs it
        "megatron-core>=0.14",  # Megatron indexed datasets, GPTDataset, blending
        "sentencepiece",
        "tokenizers",  # Hugging Face tokenizers (--tokenizer-type HuggingFaceTokenizer)
        "pyyaml",
        "tensorboard",
        "tqdm",
        "xxhash",  # checkpoint checksums (several GB/s; zlib's crc32 is the fallback)
        "matplotlib",  # tools/plot_runs.py
    ],
    extras_require={
        # triton: CUDA torch brings it; the CPU tests run the kernels in its interpreter (TRITON_INTERPRET=1)
        # scikit-learn: its bundled digits are the embedded image data (LongViT, the σ-VAE, LatentLM demos)
        # pytest-xdist: tests/run.sh runs the suite in 2 worker processes, a test file per worker at a time
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "transformers", "safetensors", "triton", "scikit-learn",
                "pillow",  # pillow: the image pipeline's PyTorch fallback (tests/test_image_pipeline.py)
                "accelerate",  # transformers' BitNet loader needs it (tests/test_hf_interop.py)
                "torchao>=0.18"],  # the FP8 tests (tests/test_fp8.py)
        # FP8 training (--fp8-format): torchao's float8 linears (megalatent/distributed/fp8.py); pure Python on
        # this path (its CUDA extensions are not needed: their "Failed to load" warnings at import are harmless)
        "fp8": ["torchao>=0.18"],
        "mpi": ["mpi4py", "mpich"],
        # scikit-learn: its wheel carries the digits images, the σ-VAE tokenizer's default data (no download)
        # pillow: decoding in the image pipeline's PyTorch fallback (megalatent/data/image_pipeline.py)
        "vision": ["nvidia-dali-cuda130", "scikit-learn", "pillow"],
    },
    entry_points={"console_scripts": ["megalatent-pretrain=megalatent.pretrain:main"]},
)

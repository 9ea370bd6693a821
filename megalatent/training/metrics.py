"""Throughput accounting and Megatron-like log lines, printed and written to tensorboard/wandb.

MFU = achieved model FLOP/s per device / the device's dense bf16 peak. Model FLOPs come from the
family's `flops_per_token` (see models.decoder.dense_decoder_flops_per_token for the convention).
"""
from __future__ import annotations

import datetime
import resource
import sys
from typing import Optional

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs our users run on; matched by substring.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0, "A100": 312.0, "A800": 312.0}


def device_peak_tflops(override: Optional[float]) -> Optional[float]:
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None  # a CPU has no meaningful tensor-core peak; pass --peak-tflops to get an MFU
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsWriter:
    """Tensorboard always (when a directory is given), wandb when installed and asked for."""

    def __init__(self, tensorboard_dir: Optional[str], wandb_project: Optional[str], config: dict):
        self.tb = None
        self.wandb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project:
            try:
                import wandb
                self.wandb = wandb.init(project=wandb_project, config=config)
            except ImportError:
                print("WARNING: --wandb-project given but wandb is not installed; logging to tensorboard only",
                      file=sys.stderr)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def log(msg: str) -> None:
    """One line to stdout with a timestamp; flushed so SLURM logs are current."""
    print(f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] {msg}", flush=True)


def iteration_line(it: int, total: int, values: dict) -> str:
    """The Megatron-LM log line, with tokens/s, MFU and peak memory appended."""
    parts = [f"iteration {it:8d}/{total:8d}",
             f"consumed samples: {values['consumed_samples']:12d}",
             f"consumed tokens: {values['consumed_tokens']:14d}",
             f"elapsed time per iteration (ms): {values['ms_per_iter']:.1f}",
             f"tokens per second: {values['tokens_per_s']:.1f}",
             f"throughput per GPU (TFLOP/s/GPU): {values['tflops']:.3f}"]
    if values.get("mfu") is not None:
        parts.append(f"MFU: {100 * values['mfu']:.2f}%")
    parts += [f"learning rate: {values['lr']:.6E}",
              f"global batch size: {values['global_batch_size']:5d}",
              f"lm loss: {values['loss']:.6E}"]
    parts += [f"{name} loss: {v:.6E}" for name, v in (values.get("loss_parts") or {}).items()]
    parts += [f"{label}: {text}" for label, text in values.get("extra", ())]  # the step hooks' entries
    parts += [f"grad norm: {values['grad_norm']:.4f}",
              f"number of skipped iterations: {values['skipped']:3d}",
              f"number of nan iterations: {values['nan']:3d}"]
    parts.append(f"peak memory (GB): {values['peak_mem_gb']:.2f}")
    return " " + " | ".join(parts) + " |"

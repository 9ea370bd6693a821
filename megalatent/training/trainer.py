"""The training loop: micro-batches with gradient accumulation, clipping, the schedule, validation,
logging, checkpoints on an interval, on a signal and on the time limit.

Non-finite steps: a step whose loss or gradient norm is NaN/inf is skipped (never applied) and counted; the
run stops with TrainingStopped after --max-consecutive-skipped-iterations of them in a row, or at the first
one with --check-for-nan-in-loss-and-grad, naming the last good iteration. Weights that are not finite are
never saved.

The loss of a step is the mean over every loss-bearing token of the global batch, however it is split
into micro-batches and data-parallel ranks, so changing --micro-batch-size or the number of ranks does
not change the optimisation (tests/test_training.py checks GBS = 4 x MBS against one big batch).
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict
from typing import Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from megalatent.config import Config
from megalatent.distributed import checkpoint as ckpt
from megalatent.distributed.layout import ParallelLayout
from megalatent.distributed.pipeline import Pipeline
from megalatent.training.hooks import StepHook, StepReport
from megalatent.training.metrics import MetricsWriter, device_peak_tflops, iteration_line, log, peak_memory_gb
from megalatent.training.objectives import LANGUAGE_MODELING, Objective
from megalatent.training.optim import build_optimizer, clip_grad_norm_, set_step_hyperparameters
from megalatent.training.schedules import LRSchedule


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    """bf16 compute (autocast, and bf16 FSDP all-gathers) by default on a GPU, fp32 on CPU."""
    return cfg.training.bf16 if cfg.training.bf16 is not None else device.type == "cuda"


class TrainingStopped(RuntimeError):
    """The run cannot usefully go on (it diverged); the message says where it stopped and what to do."""


class StopRequest:
    """Set by SIGUSR1/SIGTERM (SLURM's pre-emption warnings); acted on at the next step boundary.

    Installed first thing at start-up (SLURM may signal a minute early, while data and model are
    still being built): a signal before the first step stops the run right after it, with a checkpoint.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.signal_name: Optional[str] = None

    def install(self) -> "StopRequest":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name


class Trainer:
    """Trains this rank's model parts: the whole (parallelized) model, or its pipeline stages.

    What it trains on is the `objective` (training/objectives.py), how context parallelism cuts a
    sequence is `cp_split`, and a model's optional features act around each step through `hooks`
    (training/hooks.py): all three come from the model's family (see pretrain.make_trainer)."""

    def __init__(self, cfg: Config, layout: ParallelLayout, device: torch.device, parts, train_loader,
                 valid_loader, flops_per_token: float, stop: Optional[StopRequest] = None,
                 pipeline: Optional[Pipeline] = None, *, objective: Objective = LANGUAGE_MODELING,
                 cp_split: str = "zigzag", hooks: tuple[StepHook, ...] = ()):
        self.cfg, self.layout, self.device = cfg, layout, device
        self.parts: list[nn.Module] = list(parts) if isinstance(parts, (list, tuple)) else [parts]
        self.pipeline = pipeline
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.optimizers = [build_optimizer(part, cfg.training) for part in self.parts]
        self.schedule = LRSchedule(cfg.training)
        self.flops_per_token = flops_per_token
        self.iteration = 0
        self.skipped = self.nan = 0
        self.consecutive_skipped = 0
        self.last_good_iteration = 0  # the last step that was applied (or the checkpoint resumed from)
        self.is_logger = layout.rank == 0
        self.autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if uses_bf16(cfg, device)
                         else contextlib.nullcontext)
        self.peak_tflops = device_peak_tflops(cfg.logging.peak_tflops)
        self.writer = MetricsWriter(cfg.logging.tensorboard_dir, cfg.logging.wandb_project,
                                    cfg.to_flat_dict()) if self.is_logger else None
        self.stop = stop if stop is not None else StopRequest()
        # Forward and backward of a vocab-sharded loss must both run inside loss_parallel().
        self.loss_context = loss_parallel if layout.tp > 1 else contextlib.nullcontext
        self.objective, self.cp_split, self.hooks = objective, cp_split, tuple(hooks)
        self.reports: list[StepReport] = []  # the last step's, from the hooks, for logs
        self.loss_parts: Optional[dict[str, float]] = None  # the last step's mean of each loss part, for logs
        self.start_time = time.time()

    @property
    def model(self) -> nn.Module:
        """The model, when this rank holds all of it (no pipeline parallelism)."""
        assert len(self.parts) == 1, "this rank holds several pipeline stages; use .parts"
        return self.parts[0]

    # ---------------------------------------------------------------- checkpoints
    def train_state(self) -> dict:
        return {"consumed_samples": self.train_loader.consumed_samples, "skipped": self.skipped, "nan": self.nan,
                "model_config": asdict(self.cfg.model), "data_loader": self.train_loader.state_dict(),
                "tokenizer_model": self.cfg.data.tokenizer_model}

    def _weights_finite(self) -> bool:
        """Whether every rank's weights are finite (one flag per parameter, one host sync, one all-reduce)."""
        flags = [torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()
                 for part in self.parts for p in part.parameters()]
        finite = bool(torch.stack(flags).all()) if flags else True
        return self.layout.all_reduce_max(0.0 if finite else 1.0) == 0.0

    def save(self) -> None:
        if self.cfg.checkpoint.save is None:
            return
        if not self._weights_finite():
            raise TrainingStopped(
                f"the weights at iteration {self.iteration} are not finite: not saving them to "
                f"{self.cfg.checkpoint.save} (its checkpoints are untouched; the last good step was iteration "
                f"{self.last_good_iteration}). Resume from a checkpoint with a lower --lr or --clip-grad")
        t0 = time.time()
        path = ckpt.save_checkpoint(self.cfg.checkpoint.save, self.iteration, self.parts, self.optimizers,
                                    self.train_state())
        if self.is_logger:
            log(f"saved checkpoint at iteration {self.iteration} to {path} ({time.time() - t0:.1f} s)")

    def resume(self, path: str) -> None:
        c = self.cfg.checkpoint
        # A checkpoint of weights alone (an import: tools/convert_checkpoint.py from-hf) loads as --no-load-optim.
        weights_only = c.no_load_optim or ckpt.read_train_state(path).get("weights_only", False)
        state = ckpt.load_checkpoint(path, self.parts, None if weights_only else self.optimizers,
                                     load_rng=not c.no_load_rng)
        if not weights_only:  # weights-only loads start the schedule and data afresh
            self.iteration = state["iteration"]
            self.train_loader.load_state_dict(state["data_loader"])
            self.skipped, self.nan = state["skipped"], state["nan"]
            self.last_good_iteration = self.iteration
        if self.is_logger:
            log(f"resumed from checkpoint at iteration {state['iteration']} ({path}); "
                f"consumed samples {state['consumed_samples']}")

    # ---------------------------------------------------------------- one step
    def _sync_grads_on(self, last: bool) -> None:
        # ZeRO-1 ("optim") accumulates full gradients and reduce-scatters once per step; ZeRO-2/3
        # reduce-scatter after every micro-batch so that only gradient shards are kept.
        # (Pipeline stages leave this to the schedule, which syncs on the last micro-batch.)
        per_step = self.cfg.parallel.data_parallel_sharding_strategy == "optim"
        for part in self.parts:
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(last or not per_step)

    def _forward_backward(self, micro_batches, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Runs the micro-batches (backward too when `scale` is given: the factor applied to each
        micro-batch's summed loss). Returns this rank's summed loss (0 off the last stage), per part of the
        objective's loss ([1] when it has no parts)."""
        loss_sum = torch.zeros(max(1, len(self.objective.loss_parts)), device=self.device)
        train = scale is not None
        if self.pipeline is not None:
            last_stage = self.pipeline.last_stage(self.parts)
            parts = []

            def loss_fn(output, target):
                micro_loss = self.objective.pipeline_loss(last_stage, output, target)
                parts.append(micro_loss.detach())
                return micro_loss.sum() * scale if train else micro_loss.sum()

            batch = {k: torch.cat([mb[k] for mb in micro_batches]).to(self.device) for k in micro_batches[0]}
            with self.loss_context(), self.autocast():
                self.pipeline.run(self.parts, self.objective.pipeline_inputs(batch),
                                  self.objective.pipeline_targets(batch), len(micro_batches), loss_fn, train)
            # Only the last stage computes losses; on the first step torch.distributed.pipelining's metadata
            # inference runs the loss too (checked: counting it changes step 1's loss), so keep the step's last
            # micro-batches, as moe_stats does.
            for micro_loss in parts[-len(micro_batches):]:
                loss_sum += micro_loss
            return loss_sum
        for i, mb in enumerate(micro_batches):
            if train:
                self._sync_grads_on(i == len(micro_batches) - 1)
            mb = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
            with self.loss_context():
                with self.autocast():
                    output = self.objective.forward(self.model, mb)
                micro_loss = self.objective.loss_sum(output, mb)
                if train:
                    (micro_loss.sum() * scale).backward()
            loss_sum += micro_loss.detach()
        return loss_sum

    def _local_tokens(self, micro_batches):
        """This rank's share of each micro-batch: its sequence chunks under context parallelism."""
        if self.layout.cp == 1:
            return micro_batches
        return [self.objective.shard(mb, self.layout.cp_rank, self.layout.cp, self.cp_split) for mb in micro_batches]

    def _counts(self, micro_batches) -> torch.Tensor:
        """This rank's loss-bearing items (tokens, images) in these micro-batches, then each loss part's."""
        counts = [sum(self.objective.count(mb) for mb in micro_batches).reshape(1)]
        if self.objective.loss_parts:
            counts.append(sum(self.objective.part_counts(mb) for mb in micro_batches))
        return torch.cat(counts).to(self.device, torch.float32)

    def _part_means(self, part_sums: torch.Tensor, counts: torch.Tensor) -> Optional[dict[str, float]]:
        """Each loss part's mean over its own items (a part without items in the step: 0), for the log."""
        if not self.objective.loss_parts:
            return None
        means = (part_sums / counts[1:].clamp(min=1)).tolist()
        return dict(zip(self.objective.loss_parts, means))

    def train_step(self, micro_batches) -> tuple[float, float]:
        loss_sum, counts, grad_norm = self.compute_gradients(micro_batches)
        loss = (loss_sum.sum() / counts[0]).item()
        self.loss_parts = self._part_means(loss_sum, counts)
        grad_norm = grad_norm.item()
        if not (math.isfinite(grad_norm) and math.isfinite(loss)):  # skipped, never applied, and counted
            self.nan += 1
            self.skipped += 1
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            return loss, grad_norm
        self.apply_gradients()
        return loss, grad_norm

    def compute_gradients(self, micro_batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A step up to the optimizer: forward and backward of the micro-batches, the step hooks, clipping.
        Returns (the summed loss of every rank, per part; the global counts; the gradient norm before
        clipping) as tensors, none read back to the host here (the planner runs this on fake tensors)."""
        for part in self.parts:
            part.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        micro_batches = self._local_tokens(micro_batches)
        counts = self.layout.all_reduce_sum(self._counts(micro_batches), ("dp", "cp"))
        global_tokens = counts[0]
        for hook in self.hooks:
            hook.start_step(len(micro_batches))
        # Gradient reduction over the data- and context-parallel ranks averages; scaling by their
        # number makes it the sum, so the step's gradient is that of the mean loss over every token
        # of the global batch.
        loss_sum = self._forward_backward(micro_batches, scale=self.layout.dp * self.layout.cp / global_tokens)
        loss_sum = self.layout.all_reduce_sum(loss_sum, ("pp", "dp", "cp"))
        self.reports = [r for r in (hook.end_step(self.device) for hook in self.hooks) if r is not None]
        grad_norm = clip_grad_norm_(self.parts, self.cfg.training.clip_grad,
                                    self.layout.group("pp") if self.layout.pp > 1 else None,
                                    self.pipeline.replicas(self.parts) if self.pipeline is not None else set())
        return loss_sum, counts, grad_norm

    def apply_gradients(self) -> None:
        """The optimizer step with this iteration's lr and weight decay, then the hooks' after-step work."""
        lr, weight_decay = self.schedule(self.iteration), self.schedule.weight_decay(self.iteration)
        for opt in self.optimizers:
            set_step_hyperparameters(opt, lr, weight_decay)
            opt.step()
        for hook in self.hooks:
            hook.after_optimizer_step()

    @torch.no_grad()
    def evaluate(self) -> Optional[tuple[float, Optional[dict[str, float]]]]:
        """(mean validation loss, each loss part's mean or None) over --eval-iters global batches, always the
        same ones."""
        if self.valid_loader is None:
            return None
        for part in self.parts:
            part.eval()
        self.valid_loader.load_state_dict({"consumed_samples": 0})
        parts = len(self.objective.loss_parts)
        loss_sum = torch.zeros(max(1, parts), device=self.device)
        counts = torch.zeros(1 + parts, device=self.device)
        for _ in range(self.cfg.training.eval_iters):
            micro_batches = self._local_tokens(self.valid_loader.next_global_batch())
            loss_sum += self._forward_backward(micro_batches, scale=None)
            counts += self._counts(micro_batches)
        loss_sum = self.layout.all_reduce_sum(loss_sum, ("pp",))
        both = self.layout.all_reduce_sum(torch.cat([loss_sum, counts]), ("dp", "cp"))
        loss_sum, counts = both[:len(loss_sum)], both[len(loss_sum):]
        return (loss_sum.sum() / counts[0]).item(), self._part_means(loss_sum, counts)

    # ---------------------------------------------------------------- the loop
    def _should_stop(self) -> Optional[str]:
        limit = self.cfg.training.exit_duration_in_mins
        reason = 0.0
        if self.stop.signal_name is not None:
            reason = 1.0
        elif limit is not None and time.time() - self.start_time > 60 * limit:
            reason = 2.0
        agreed = self.layout.all_reduce_max(reason)  # every rank must stop at the same step
        return {0.0: None, 1.0: "signal", 2.0: "--exit-duration-in-mins"}[agreed]

    def _check_skipped(self, loss: float, grad_norm: float) -> None:
        """Count a step's outcome; stop the run when non-finite steps go on (see the module doc)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive_skipped = 0
            self.last_good_iteration = self.iteration
            return
        self.consecutive_skipped += 1
        t = self.cfg.training
        if t.check_for_nan_in_loss_and_grad:
            why = "--check-for-nan-in-loss-and-grad stops at the first one"
        elif self.consecutive_skipped >= t.max_consecutive_skipped_iterations:
            why = (f"{self.consecutive_skipped} steps in a row were skipped (--max-consecutive-skipped-iterations "
                   f"{t.max_consecutive_skipped_iterations})")
        else:
            return
        raise TrainingStopped(
            f"iteration {self.iteration}: loss {loss}, gradient norm {grad_norm}; {why}. The last good iteration "
            f"was {self.last_good_iteration} (this step is not saved). Resume from a checkpoint at or before it "
            "with a lower --lr or --clip-grad, or check the data")

    def train(self) -> None:
        """Train to --train-iters, or until a stop; the events reach tensorboard however it ends."""
        try:
            self._train()
        finally:
            if self.is_logger:
                self.writer.close()

    def _train(self) -> None:
        t, log_cfg = self.cfg.training, self.cfg.logging
        tokens_per_step = t.global_batch_size * self.cfg.model.seq_length
        interval_time, interval_steps = 0.0, 0
        first_step = True
        while self.iteration < t.train_iters:
            t0 = time.time()
            loss, grad_norm = self.train_step(self.train_loader.next_global_batch())
            self.iteration += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            interval_time += time.time() - t0
            interval_steps += 1
            if self.is_logger:
                # Scalars are logged against the iteration; consumed-tokens maps it to tokens (tools/plot_runs.py).
                self.writer.scalars({"lm-loss": loss, "grad-norm": grad_norm,
                                     "learning-rate": self.schedule(self.iteration - 1),
                                     "consumed-tokens": self.train_loader.consumed_samples * self.cfg.model.seq_length},
                                    self.iteration)
            if first_step:
                self._report_memory()
            # The first step of a run is always logged: the starting loss (and a resumed run's continuity).
            if first_step or self.iteration % log_cfg.log_interval == 0 or self.iteration == t.train_iters:
                self._log_iteration(loss, grad_norm, interval_time / interval_steps, tokens_per_step)
                interval_time, interval_steps = 0.0, 0
            first_step = False
            self._check_skipped(loss, grad_norm)
            if t.eval_interval and self.iteration % t.eval_interval == 0:
                self._log_validation()
            reason = self._should_stop()
            if reason is not None:
                if self.is_logger:
                    log(f"stopping at iteration {self.iteration} on {reason}: saving a checkpoint")
                self.save()
                return
            interval = self.cfg.checkpoint.save_interval
            if interval and self.iteration % interval == 0 and self.iteration < t.train_iters:
                self.save()
        if t.eval_interval and self.iteration % t.eval_interval:
            self._log_validation()  # a final validation unless the last step just had one
        self.save()
        if self.is_logger:
            log(f"training finished at iteration {self.iteration}")

    def _report_memory(self) -> None:
        """Once, after the first step: every rank's peak memory, printed by rank 0 (the memory of
        pipeline stages and shards differs between ranks, and the fullest rank is the one that OOMs)."""
        peak = peak_memory_gb(self.device)
        peaks = [peak] * self.layout.world_size
        if self.layout.world_size > 1:
            torch.distributed.all_gather_object(peaks, peak)
        if self.is_logger:
            kind = "GPU allocated" if self.device.type == "cuda" else "host RSS"
            log(f"peak memory per rank after the first step (GB, {kind}): "
                + ", ".join(f"{r}: {p:.2f}" for r, p in enumerate(peaks)))

    def _log_iteration(self, loss: float, grad_norm: float, sec_per_iter: float, tokens_per_step: int) -> None:
        if not self.is_logger:
            return
        tokens_per_s = tokens_per_step / sec_per_iter
        tflops = self.flops_per_token * tokens_per_s / self.layout.world_size / 1e12
        values = {"consumed_samples": self.train_loader.consumed_samples,
                  "consumed_tokens": self.train_loader.consumed_samples * self.cfg.model.seq_length,
                  "ms_per_iter": 1000 * sec_per_iter, "tokens_per_s": tokens_per_s, "tflops": tflops,
                  "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                  "lr": self.schedule(self.iteration - 1), "global_batch_size": self.cfg.training.global_batch_size,
                  "loss": loss, "grad_norm": grad_norm, "skipped": self.skipped, "nan": self.nan,
                  "peak_mem_gb": peak_memory_gb(self.device), "loss_parts": self.loss_parts,
                  "extra": [entry for report in self.reports for entry in report.line]}
        log(iteration_line(self.iteration, self.cfg.training.train_iters, values))
        scalars = {"tokens-per-second": tokens_per_s, "tflops-per-gpu": tflops}
        if self.loss_parts is not None:
            scalars.update({f"lm-loss/{name}": v for name, v in self.loss_parts.items()})
        for report in self.reports:
            scalars.update(report.scalars)
        if values["mfu"] is not None:
            scalars["mfu"] = values["mfu"]
        self.writer.scalars(scalars, self.iteration)

    def _log_validation(self) -> None:
        result = self.evaluate()
        if result is None or not self.is_logger:
            return
        loss, parts = result
        line = f" validation loss at iteration {self.iteration} | lm loss value: {loss:.6E} |"
        scalars = {"validation/lm-loss": loss}
        if parts is None:  # a perplexity is exp of a cross-entropy, not of a mixed loss
            scalars["validation/lm-loss-ppl"] = ppl = math.exp(min(loss, 20.0))
            line += f" lm loss PPL: {ppl:.6E} |"
        else:
            line += "".join(f" {name} loss: {v:.6E} |" for name, v in parts.items())
            scalars.update({f"validation/lm-loss/{name}": v for name, v in parts.items()})
        log(line)
        self.writer.scalars(scalars, self.iteration)

"""Learning-rate schedules with Megatron's names: constant, linear, cosine, WSD, inverse-square-root,
and the two-stage schedule of the ternary-weight (b1.58) recipe.

All start with a linear warmup from 0 to --lr over the warmup steps, then follow the decay style down
to --min-lr at --lr-decay-iters and stay at --min-lr after that.

two-stage (the b1.58 "Training Tips, Code and FAQ"): the first stage decays linearly from --lr on the line that would reach
--min-lr at --lr-decay-iters; at --lr-two-stage-boundary-iter the lr drops to --lr-second-stage and
decays linearly from there to --min-lr at --lr-decay-iters. The weight decay switches at the same
step, from --weight-decay to --weight-decay-second-stage (default 0). Both are functions of the step
alone, so a resumed run picks up the right stage without any state of its own.
"""
from __future__ import annotations

import math

from megalatent.config import TrainingConfig


class LRSchedule:
    def __init__(self, cfg: TrainingConfig):
        self.max_lr, self.min_lr, self.style = cfg.lr, cfg.min_lr, cfg.lr_decay_style
        self.decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.train_iters
        self.warmup_iters = (round(cfg.lr_warmup_fraction * self.decay_iters)
                             if cfg.lr_warmup_fraction is not None else cfg.lr_warmup_iters)
        self.wsd_decay_iters = (cfg.lr_wsd_decay_iters if cfg.lr_wsd_decay_iters is not None
                                else max(1, round(0.1 * (self.decay_iters - self.warmup_iters))))
        self.wsd_style = cfg.lr_wsd_decay_style
        self.second_stage_start = (cfg.lr_two_stage_boundary_iter if cfg.lr_two_stage_boundary_iter is not None
                                   else (self.warmup_iters + self.decay_iters) // 2)
        self.second_stage_lr = cfg.lr_second_stage
        self.weight_decays = (cfg.weight_decay, cfg.weight_decay_second_stage or 0.0)

    def in_second_stage(self, step: int) -> bool:
        return self.style == "two-stage" and step >= self.second_stage_start

    def weight_decay(self, step: int) -> float:
        """The weight decay for optimizer step `step`: --weight-decay, or the second stage's."""
        return self.weight_decays[self.in_second_stage(step)]

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step `step` (0-based)."""
        if self.warmup_iters > 0 and step < self.warmup_iters:
            return self.max_lr * (step + 1) / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if self.style == "inverse-square-root":
            # max_lr at the end of warmup, then proportional to 1/sqrt(step); floored at min_lr.
            w = max(self.warmup_iters, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(w) / math.sqrt(max(step + 1, w)))
        if step >= self.decay_iters:
            return self.min_lr
        span = self.max_lr - self.min_lr
        if self.in_second_stage(step):
            progress = (step - self.second_stage_start) / (self.decay_iters - self.second_stage_start)
            return self.min_lr + (self.second_stage_lr - self.min_lr) * _decay("linear", progress)
        if self.style == "WSD":
            anneal_start = self.decay_iters - self.wsd_decay_iters
            if step < anneal_start:
                return self.max_lr
            return self.min_lr + span * _decay(self.wsd_style, (step - anneal_start) / self.wsd_decay_iters)
        progress = (step - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        return self.min_lr + span * _decay(self.style, progress)


def _decay(style: str, progress: float) -> float:
    """Fraction of the (max - min) span left at `progress` in [0, 1]."""
    if style in ("linear", "two-stage"):
        return 1.0 - progress
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "exponential":  # Megatron's WSD form: halves the remaining gap, reaching 0 at the end
        return 2.0 * 0.5 ** progress - 1.0
    raise ValueError(f"unknown decay style {style!r}")

"""AdamW with Megatron's parameter groups, and gradient-norm clipping that works on sharded grads."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from megalatent.config import TrainingConfig


def is_decayed(p: torch.Tensor) -> bool:
    """Weight decay on matrices only: norms, biases and other vectors are not decayed (as in Megatron)."""
    return p.dim() >= 2


OPTIMIZER_STATES_PER_PARAMETER = 2  # AdamW's exp_avg and exp_avg_sq, each the size of its parameter


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if is_decayed(p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_gpu = any(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=on_gpu or None)  # the fused kernel is CUDA-only; foreach on CPU


def set_step_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """This step's lr for every group and weight decay for the decayed ones (the schedule's values: set
    every step rather than kept, so that a resumed run follows the schedule of its step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group["params"] and is_decayed(group["params"][0]) else 0.0


def clip_grad_norm(parts: list[nn.Module], max_norm: float, pp_group=None, replicas: set[int] = frozenset()) -> float:
    """`clip_grad_norm_`, with the norm read back as a number."""
    return clip_grad_norm_(parts, max_norm, pp_group, replicas).item()


def clip_grad_norm_(parts: list[nn.Module], max_norm: float, pp_group=None,
                    replicas: set[int] = frozenset()) -> torch.Tensor:
    """Global L2 norm of all gradients (over every shard of every rank); scales them down to max_norm.

    `parts` are this rank's model parts (its pipeline stages); `pp_group` sums the squared norms over
    the pipeline ranks, which hold different layers; `replicas` (parameter ids) are second copies of a
    weight another stage holds too (tied embeddings), clipped but not counted twice. Returns the norm before
    clipping (the number Megatron logs as 'grad norm') as a tensor, not read back here (the planner runs this on
    fake tensors). max_norm 0 only measures.
    """
    params = [p for part in parts for p in part.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    # Gradients may live on different meshes (TP-sharded DTensors, FSDP shards, plain replicated
    # tensors such as norm weights without sequence parallelism); norm each group on its own mesh.
    groups: dict = {}
    for p in params:
        if id(p) not in replicas:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # combines the shards' partial norms over their ranks
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_group is not None:
        torch.distributed.all_reduce(total, group=pp_group)
    total = total.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total, foreach=True)
    return total

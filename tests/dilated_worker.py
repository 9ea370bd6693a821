"""Worker for tests/test_dilated.py: LongNet's distributed dilated attention on every rank of a gloo job
against the single-process module, causal and not, values and gradients; writes per-rank errors.
With Triton's interpreter on (tests/conftest.py sets it without a GPU) the first causal case on 2 ranks also runs
with the Triton kernels for the local patterns and the merge. On 3 ranks the cases have a ragged last segment
group (a pattern spanning 2 ranks over 3). The K/V rows each rank received are counted from the tensors the
all-gathers returned (a wrapper around torch.distributed's collective), not from the module's own counter."""
import importlib.util
import json
import os
import sys

import torch
import torch.distributed as dist

from megalatent.distributed.context_parallel.dilated import DistributedDilatedAttention
from megalatent.distributed.env import exit_process
from megalatent.distributed.layout import ParallelLayout
from megalatent.nn.dilated import dilated_attention

RECEIVED = []  # K/V rows each K/V all-gather brought from the other ranks of its group


def counting_all_gather(all_gather):
    def wrapped(output, input, group=None, async_op=False):
        if input.dim() == 5:  # the stacked K/V rows [rows, 2, b, h, d] (positions are [rows, 1, h])
            RECEIVED.append(output.shape[0] - input.shape[0])
        return all_gather(output, input, group=group, async_op=async_op)
    return wrapped


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    dist.all_gather_into_tensor = counting_all_gather(dist.all_gather_into_tensor)
    rank, cp = dist.get_rank(), dist.get_world_size()
    new_group = ParallelLayout(world_size=cp).subgroup
    n, heads, d = 96, 6, 8
    cases = [([12, 24, 48, 96], [1, 2, 3, 6]), ([8, 24, 200], [1, 4, 5]), ([24, 48], [2, 3])]
    if cp == 3:  # 32 tokens a rank: a 64-token segment spans ranks (0, 1), and rank 2 alone
        cases = [([16, 32, 64], [1, 2, 4]), ([32, 64, 96], [1, 3, 2])]
    errors = []
    kernel = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    for segments, ratios in cases:
        for causal in (True, False):
            g = torch.Generator().manual_seed(len(errors))
            q = torch.randn(2, heads, n, d, generator=g, requires_grad=True)
            k, v = (torch.randn(2, heads // 2, n, d, generator=g, requires_grad=True) for _ in range(2))  # GQA
            weight = torch.randn(2, heads, n, d, generator=g)
            ref = dilated_attention(q, k, v, segments, ratios, causal)
            ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
            local = n // cp
            mine = slice(rank * local, (rank + 1) * local)
            ql, kl, vl = (x.detach()[:, :, mine].clone().requires_grad_() for x in (q, k, v))
            core = DistributedDilatedAttention(segments, ratios, dist.group.WORLD, local, new_group, causal)
            RECEIVED.clear()
            out = core(ql, kl, vl, None)
            grads = torch.autograd.grad((out * weight[:, :, mine]).sum(), (ql, kl, vl))
            errors.append({"case": f"{segments}/{ratios} causal={causal}", "rank": rank, "local": local,
                           "segments": segments, "ratios": ratios,
                           "out": (out - ref[:, :, mine]).abs().max().item(),
                           "grads": [(a - b[:, :, mine]).abs().max().item() for a, b in zip(grads, ref_grads)],
                           "gathered_rows": core.gathered_rows, "received_rows": sum(RECEIVED)})
            if kernel and cp == 2 and segments == cases[0][0] and causal:
                # The first sequence only: the interpreter is slow.
                q1, k1, v1 = (x.detach()[:1].clone().requires_grad_() for x in (ql, kl, vl))
                core = DistributedDilatedAttention(segments, ratios, dist.group.WORLD, local, new_group, causal,
                                                   backend="triton")
                out = core(q1, k1, v1, None)
                grads = torch.autograd.grad((out * weight[:1, :, mine]).sum(), (q1, k1, v1))
                errors.append({**errors[-1], "case": errors[-1]["case"] + " kernel",
                               "out": (out - ref[:1, :, mine]).abs().max().item(),
                               "grads": [(a - b[:1, :, mine]).abs().max().item() for a, b in zip(grads, ref_grads)]})
    gathered = [None] * cp
    dist.all_gather_object(gathered, errors)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([e for per_rank in gathered for e in per_rank], f)
    exit_process()


if __name__ == "__main__":
    main()

"""A plan as text: the memory table per rank role, the communication per mesh dimension, the step time and
MFU, and the assumptions behind them."""
from __future__ import annotations

from megalatent.planning.hardware import GiB
from megalatent.planning.plan import Plan

ASSUMPTIONS = (
    "memory: torch's MemTracker over the real step on fake tensors (tensor storages, 512-byte blocks); needed = "
    "peak x (1 + fragmentation) + reserved (CUDA context, NCCL, workspaces)",
    "MoE routing balanced (every expert gets its share of tokens); data values play no part",
    "compute: roofline per eager operator, max(FLOPs / peak, bytes / HBM bandwidth); no fusion, no launch overhead",
    "communication: ring / all-to-all volumes at NVLink (group inside a node) or InfiniBand bandwidth, plus "
    "a latency per call; FSDP all-gathers and reduce-scatters overlap compute, every other collective is exposed",
    "pipeline bubble (p-1)/(v m) on the slowest stage (zero-bubble schedules charged the same)",
)


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def layout_line(plan: Plan) -> str:
    layout = plan.layout()
    text = (f"tp {layout['tp']}{' +SP' if layout['sequence_parallel'] else ''}, pp {layout['pp']}, "
            f"cp {layout['cp']}, dp {layout['dp']}, ep {layout['ep']}")
    return text + (f", {layout['virtual_stages']} stages per pp rank" if layout["virtual_stages"] > 1 else "")


def format_plan(plan: Plan, title: str = "") -> str:
    t = plan.target
    lines = [f"{title or plan.cfg.model.model_family} on {plan.nodes} node(s) x {plan.gpus_per_node} {t.name} "
             f"({plan.world_size} GPUs): {layout_line(plan)}",
             f"{plan.cfg.model.num_layers} layers, " + (
                 f"simulated at depths {plan.simulated_layers[0]} and {plan.simulated_layers[1]} and extrapolated "
                 "(the layers repeat)" if plan.simulated_layers else "all simulated"),
             f"memory per rank role (GiB; device {gib(plan.capacity)}, needed = peak x "
             f"{1 + plan.allowances.fragmentation:.2f} + {plan.allowances.reserved_gib:g} reserved):",
             f"  {'role':<22}{'params':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'peak':>8}{'needed':>8}"
             f"{'headroom':>10}  verdict"]
    for report in plan.roles:
        m = report.memory
        role = f"rank {report.rank}" + (f" (stages {report.stages})" if report.stages else "")
        headroom = plan.headroom(report)
        verdict = "fits" if headroom >= 0 else "DOES NOT FIT"
        lines.append(f"  {role:<22}{gib(m.parameters):>8}{gib(m.gradients):>8}{gib(m.optimizer_state):>8}"
                     f"{gib(m.activations):>8}{gib(m.peak):>8}{gib(plan.needed(report)):>8}{gib(headroom):>10}  "
                     f"{verdict}")
    lines.append("communication per step (per rank role):")
    lines.append(f"  {'role':<8}{'mesh dims':<22}{'collective':<16}{'link':<8}{'calls':>7}{'GiB':>10}{'seconds':>10}"
                 "  overlap")
    for role in plan.step.roles:
        for g in role.traffic:
            lines.append(f"  {role.rank:<8}{g.label:<22}{g.collective:<16}{g.link:<8}{g.calls:>7.0f}"
                         f"{g.bytes / GiB:>10.3f}{g.seconds:>10.4f}  "
                         + ("with compute (FSDP)" if g.overlapped else "exposed"))
    s = plan.step
    slowest = max(s.roles, key=lambda r: r.busy_s)
    lines += [f"step time: compute {slowest.compute_s:.3f} s at {t.peak_flops / 1e12:.0f} TFLOP/s "
              f"({slowest.memory_bound_s:.3f} s of it bound by HBM bandwidth), "
              f"overlapped communication {slowest.overlapped_comm_s:.3f} s, exposed {slowest.exposed_comm_s:.3f} s"
              + (f", pipeline bubble {100 * s.bubble_fraction:.1f}%" if s.bubble_fraction else "")
              + f" -> {s.step_s:.3f} s per step",
              f"MFU {100 * s.mfu:.1f}% (model FLOPs {s.model_flops:.3e} per step vs {t.peak_tflops:.0f} TFLOP/s dense "
              f"bf16 peak), {s.tokens_per_s_per_gpu:,.0f} tokens/s per GPU",
              f"verdict: {'FITS' if plan.fits else 'DOES NOT FIT'}",
              "assumptions: " + "; ".join(ASSUMPTIONS)]
    return "\n".join(lines)


def format_search(plans: list[Plan], failed: list[tuple[dict, str]]) -> str:
    """The layouts that fit, fastest first, then those that do not fit and those that could not run."""
    fitting = sorted((p for p in plans if p.fits), key=lambda p: p.step.step_s)
    unfit = [p for p in plans if not p.fits]
    lines = []
    if plans:
        p = plans[0]
        lines.append(f"{p.cfg.model.model_family} on {p.nodes} node(s) x {p.gpus_per_node} {p.target.name} "
                     f"({p.world_size} GPUs): {len(plans) + len(failed)} valid layouts, {len(fitting)} fit; "
                     "ranked by predicted step time")
    lines.append(f"{'#':>3}  {'layout':<52}{'step s':>9}{'MFU %':>7}{'peak GiB':>10}{'headroom GiB':>14}")
    for i, p in enumerate(fitting + unfit, 1):
        worst = min(p.roles, key=p.headroom)
        lines.append(f"{i if p.fits else '-':>3}  {layout_line(p):<52}{p.step.step_s:>9.3f}{100 * p.step.mfu:>7.1f}"
                     f"{gib(worst.memory.peak):>10}{gib(p.headroom(worst)):>14}" + ("" if p.fits else "  does not fit"))
    for layout, reason in failed:
        lines.append(f"  -  {str(layout):<52} not run: {reason}")
    return "\n".join(lines)

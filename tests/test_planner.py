"""The planner (megalatent/planning, tools/plan.py) against real runs, on every example config, and its
command line.

Honesty: tiny models (a GPT; LongNet at 2 ranks) run for real at 1, 2, 4 and 8 ranks and a ~100M GPT (GPT-2
small's shape) at 1, 2 and 4 (CASES), on 8 gloo ranks started once (tests/planner_worker.py: case by case on its first k
ranks, each rank's step measured by the planner's instruments, planning/measure.py) while this process plans the
same cases the way tools/plan.py does (plan_layout for this CPU: fake tensors and process groups at the case's
world size, one simulation per rank role, fewer micro-batches and, where layers repeat, fewer layers,
extrapolated). Memory is measured by torch's MemTracker (the live bytes of every tensor storage) around the real
step; the simulation's tracker is the same instrument on fake tensors, so the comparison checks the simulation:
the predicted peak must be within 15% of the measured one on every rank. The instrument itself is checked
against the operating system on the ~100M model: the peak the plan predicts against its process's resident
high-water mark minus its resident size before the build (tensors are most of that process). The collectives of
each real rank, recorded by the planner's recorder (a dispatch mode around the real gloo step: every c10d and
functional collective with its group and payload), must equal the plan's for its role exactly: per group and
kind, the calls and the bytes.
"""
import importlib.util
import json
import os
import shlex

import pytest

import planner_worker
from conftest import REPO
from megalatent.cli import run_tool
from megalatent.families import parse_args
from megalatent.planning.estimate import spanned_dims
from megalatent.planning.hardware import HOST, target
from megalatent.planning.plan import plan_layout

_spec = importlib.util.spec_from_file_location("plan_tool", os.path.join(REPO, "tools", "plan.py"))
plan_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan_tool)

TINY = ["--config", "examples/tiny/gpt.yaml", "--vocab-size", "8192"]
# ~110M parameters (GPT-2 small's shape): what a CPU process of a few GB holds mostly as tensors. Every ~100M
# case takes the same step, 2 sequences of 128 tokens, whatever its ranks.
GPT_100M = ["--config", "examples/gpu/gpt_125m.yaml", "--vocab-size", "32000", "--seq-length", "128",
            "--global-batch-size", "2"]

# (name, ranks, flags). The ~100M 1-rank case comes first: a rank's resident high-water mark is its process's.
# The ~100M layouts at 2 and 4 ranks are those that cost least here while each exercises something the other
# does not: ZeRO-3 over the whole model (2), and a pipeline with its tied embeddings and tensor parallelism (4).
# Measured (CPU seconds on this machine, all ranks, build and step; the plan's beside it): FSDP2 12 + 2,
# PP2 x TP2+SP 21 + 14. At 8 ranks the tiny model runs: tensor parallelism under FSDP is its layout too, and at
# ~100M it would cost the most of all (TP4+SP x FSDP2 31 + 2; the tiny 8-rank layout 60 + 13, FSDP8 52 + 2): a
# real step of a ~100M model costs little arithmetic but much Python per operator and per rank, and FSDP's
# gathers.
CASES = [
    ("~100M, 1 rank (12 layers: 2 and 3 simulated)", 1, GPT_100M + ["--micro-batch-size", "2"]),
    ("1 rank", 1, TINY),
    ("2 ranks: LongNet, context parallel (dilated segments across ranks, two roles)", 2, [
        "--config", "examples/tiny/longnet.yaml", "--vocab-size", "8192", "--context-parallel-size", "2",
        "--global-batch-size", "8"]),
    ("4 ranks: TP2+SP x FSDP2 (6 layers: 2 and 3 simulated; 4 micro-batches: 2 simulated)", 4, TINY + [
        "--num-layers", "6", "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--micro-batch-size", "1", "--global-batch-size", "8"]),
    ("8 ranks: TP2+SP x PP2 (1F1B, tied embeddings) x FSDP2 (5 micro-batches: 4 simulated)", 8, TINY + [
        "--num-layers", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--pipeline-model-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size", "10"]),
    ("~100M, 2 ranks: FSDP2 (ZeRO-3 of the whole model)", 2, GPT_100M + ["--micro-batch-size", "1"]),
    ("~100M, 4 ranks: PP2 (1F1B, tied embeddings; 2 micro-batches) x TP2+SP (2 and 3 layers per stage simulated)",
     4, GPT_100M + ["--micro-batch-size", "1", "--pipeline-model-parallel-size", "2",
                    "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(measured: case -> rank -> result, planned: case -> Plan): the real ranks run while this process plans."""
    out = str(tmp_path_factory.mktemp("planner"))
    ranks = planner_worker.start(out, [{"ranks": ranks, "argv": argv} for _, ranks, argv in CASES], 8)
    try:
        planned = [plan_layout(parse_args(argv), 1, world, HOST) for _, world, argv in CASES]
    finally:
        codes = planner_worker.wait(ranks, timeout_s=600)
    assert codes == [0] * len(codes), f"exit codes of the real ranks: {codes} (their tracebacks are above)"
    measured = [{r: json.load(open(os.path.join(out, f"case{i}", f"rank{r}.json"))) for r in range(world)}
                for i, (_, world, _) in enumerate(CASES)]
    return measured, planned


@pytest.fixture(scope="module")
def planners():
    """Two processes (the cores are two) that plan side by side, for every test that does: started once, from
    planner_worker's forkserver (no imports of their own), and warm from one test to the next."""
    with planner_worker.planners(2) as pool:
        yield pool


def totals(transfers, weights, same_role: bool) -> dict:
    """(kind, group) -> [calls, bytes] in the step; the group by its ranks, or (another rank of the same role,
    whose groups are others of the same sizes) by its size."""
    out = {}
    for (kind, ranks, nbytes), weight in zip(transfers, weights):
        entry = out.setdefault((kind, tuple(ranks) if same_role else len(ranks)), [0, 0])
        entry[0] += weight
        entry[1] += weight * nbytes
    return {key: [round(calls, 6), round(nbytes)] for key, (calls, nbytes) in out.items()}


@pytest.mark.parametrize("case", range(len(CASES)), ids=[name for name, _, _ in CASES])
def test_the_plan_is_what_a_real_run_does(runs, case):
    measured, planned = runs
    name, ranks, _ = CASES[case]
    plan = planned[case]
    for rank, real in measured[case].items():
        stage = rank // (ranks // plan.layout()["pp"])  # ranks are laid out pipeline stage by stage
        role = next((r for r in plan.roles if r.rank == rank), None) or next(
            r for r in plan.roles if r.coordinates["pp"] == stage)
        peak, predicted = real["memory"]["peak"], role.memory.peak
        assert abs(predicted - peak) <= 0.15 * peak, f"{name}, rank {rank}: predicted {predicted}, measured {peak}"
        same = role.rank == rank
        simulated = totals([(t.kind, t.ranks, t.bytes) for t in role.transfers], role.weights, same)
        assert simulated == totals(real["transfers"], [1] * len(real["transfers"]), same), f"{name}, rank {rank}"


def test_the_tracker_measures_what_the_process_holds(runs):
    """The ~100M case's predicted peak against its process's resident memory."""
    measured, planned = runs
    real, (role,) = measured[0][0], planned[0].roles
    resident = real["peak_resident"] - real["resident_before_build"]
    assert role.memory.peak > 1.5 * 2**30  # tensors are most of the process
    assert abs(role.memory.peak - resident) <= 0.15 * resident, (role.memory, resident)


@pytest.mark.parametrize("argv", [
    ["--config", "examples/tiny/yoco.yaml", "--vocab-size", "8192", "--num-layers", "10"],
    ["--config", "examples/tiny/gpt.yaml", "--vocab-size", "8192", "--num-layers", "10", "--num-experts", "4",
     "--moe-layer-freq", "2", "--expert-model-parallel-size", "2"],
], ids=["yoco (self- then cross-decoder)", "MoE every 2nd layer, EP2"])
def test_layers_extrapolated_from_two_depths_equal_all_simulated(planners, argv):
    """What depth.py assumes: a plan from 4 and 6 layers (the units repeat by 2) equals the plan of all 10. (On
    a GPU: torch's fake grouped matmul of the MoE experts takes bf16 only.)"""
    ranks = 2 if "--expert-model-parallel-size" in argv else 1
    fast, full = (plan.result() for plan in [  # side by side
        planners.submit(plan_layout, parse_args(argv), 1, ranks, target("h100-80gb"), full_depth=full)
        for full in (False, True)])
    assert fast.simulated_layers == (4, 6) and full.simulated_layers is None
    for a, b in zip(fast.roles, full.roles):
        assert a.memory == b.memory
        assert a.cost.flops == pytest.approx(b.cost.flops, rel=1e-9)
        assert totals([(t.kind, t.ranks, t.bytes) for t in a.transfers], a.weights, True) == \
            totals([(t.kind, t.ranks, t.bytes) for t in b.transfers], b.weights, True)


def documented_command(path: str, tool: str) -> list[str]:
    """The arguments of the first `<tool> ...` command in a config's comments (its continued lines joined)."""
    lines = [line[1:].strip() for line in open(path) if line.startswith("#")]
    for i, line in enumerate(lines):
        if tool in line:
            text = line.split(tool, 1)[1]
            while text.endswith("\\"):
                i += 1
                text = text[:-1] + " " + lines[i]
            return shlex.split(text)
    return []


LAYOUT_FLAGS = ("--nodes", "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size",
                "--expert-model-parallel-size", "--sequence-parallel")
CONFIGS = sorted(os.path.relpath(os.path.join(d, f), REPO) for d in (os.path.join(REPO, "examples", "cluster"),
                 os.path.join(REPO, "examples", "gpu")) for f in os.listdir(d) if f.endswith(".yaml"))


def test_every_example_config_fits_at_its_documented_layout(planners, tmp_path):
    """Each config's `python tools/plan.py` comment, run as written (two at a time: the cores are two): it plans
    as fitting, at the layout of the config's sbatch command where it has one."""
    commands = {}
    for path in CONFIGS:
        argv = documented_command(os.path.join(REPO, path), "tools/plan.py")
        assert argv[:2] == ["--config", path], f"{path}: no `python tools/plan.py --config {path} ...` comment"
        sbatch = documented_command(os.path.join(REPO, path), "sbatch")
        for flag in LAYOUT_FLAGS:  # the plan's layout is the launch's
            if flag in sbatch or (flag != "--nodes" and sbatch):
                assert layout_flag(argv, flag) == layout_flag(sbatch, flag), f"{path}: {flag} of plan != sbatch"
        commands[path] = argv + ["--json", str(tmp_path / (os.path.basename(path) + ".json"))]
    codes = dict(zip(commands, planners.map(planner_worker.plan_command, commands.values())))
    assert codes == {path: 0 for path in commands}, codes
    unfit = {}
    for path, argv in commands.items():
        plan = json.load(open(argv[-1]))
        if not plan["fits"]:
            unfit[path] = [(r["rank"], r["memory_bytes"]["peak"] / 2**30) for r in plan["roles"]]
    assert not unfit, f"configs that do not fit at their documented layout (rank, peak GiB): {unfit}"


def layout_flag(argv: list[str], flag: str):
    if flag not in argv:
        return None
    i = argv.index(flag)
    return True if i + 1 == len(argv) or argv[i + 1].startswith("--") else argv[i + 1]


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "h100"], "--gpu 'h100' is unknown; choose one of"),
    (["--tensor-model-parallel-size", "3"], "is not divisible by --tensor-model-parallel-size 3"),
    (["--vocab-size", "0"], "--vocab-size must be >= 2"),
])
def test_bad_input_is_one_line_naming_the_fix_and_exit_2(capsys, argv, message):
    tiny = ["--config", "examples/tiny/gpt.yaml", "--vocab-size", "8192", "--nodes", "1", "--gpus-per-node", "2"]
    assert run_tool(plan_tool.main, tiny + argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_search_ranks_the_layouts_that_fit(tmp_path, capsys):
    out = tmp_path / "search.json"
    argv = ["--config", "examples/tiny/longnet.yaml", "--vocab-size", "8192", "--nodes", "1", "--gpus-per-node", "2",
            "--search", "--jobs", "2", "--json", str(out)]  # two layouts at a time: the cores are two
    assert plan_tool.main(argv) == 0
    result = json.load(open(out))
    layouts = [(p["layout"]["tp"], p["layout"]["pp"], p["layout"]["cp"], p["layout"]["dp"]) for p in result["plans"]]
    assert set(layouts) == {(1, 1, 1, 2), (2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 1)}, layouts
    times = [p["step_s"] for p in result["plans"] if p["fits"]]
    assert times == sorted(times) and len(times) == 4
    assert "  1  tp" in capsys.readouterr().out


def test_a_group_is_named_by_the_mesh_dims_its_ranks_span():
    shape = {"pp": 2, "dp": 2, "cp": 2, "tp": 2}  # rank = ((pp * 2 + dp) * 2 + cp) * 2 + tp
    assert spanned_dims((0, 1), shape) == "tp"
    assert spanned_dims((0, 4), shape) == "dp"
    assert spanned_dims((0, 2, 4, 6), shape) == "dp×cp"
    assert spanned_dims((0, 8), shape) == "pp"
    assert spanned_dims((0, 2, 4), shape) == "dp×cp (part: 3 ranks)"

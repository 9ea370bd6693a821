"""Plot training runs from their tensorboard events: loss (and its parts), gradient norm, throughput and
learning rate against consumed tokens, one line per run, as a PNG.

    python tools/plot_runs.py runs/longnet-123 runs/gpt-124 --output runs.png
    python tools/plot_runs.py runs/ckpt-tb --output runs.png --json runs.json   # also the plotted numbers

Each argument is a run directory of the launch scripts (its tensorboard/ folder is read) or a
--tensorboard-dir itself. The trainer logs every scalar against the iteration and, per iteration, the
`consumed-tokens` scalar, which turns iterations into tokens here: runs with different batch sizes or
sequence lengths line up at equal data. (Events written before that scalar existed are plotted against
the iteration.) A resumed run's events continue in the same directory; steps a restart repeated keep their
latest value.
"""
import argparse
import json
import os
import sys

from megalatent.cli import run_tool

TOKENS = "consumed-tokens"
PANELS = [  # (title, tags: (tag or prefix ending in "/", style))
    ("loss", [("lm-loss", "-"), ("lm-loss/", "--"), ("validation/lm-loss", "o:")]),
    ("gradient norm", [("grad-norm", "-")]),
    ("throughput (tokens/s)", [("tokens-per-second", "-")]),
    ("learning rate", [("learning-rate", "-")]),
]


def events_dir(path: str) -> str:
    """A run directory's tensorboard/ folder, or `path` itself."""
    nested = os.path.join(path, "tensorboard")
    tb = nested if os.path.isdir(nested) else path
    if not os.path.isdir(tb):
        raise ValueError(f"{path}: no such directory (give a run directory or a --tensorboard-dir)")
    return tb


def run_name(path: str) -> str:
    """The run directory's name (that of a tensorboard/ folder's parent)."""
    path = os.path.normpath(os.path.abspath(path))
    return os.path.basename(os.path.dirname(path) if os.path.basename(path) == "tensorboard" else path)


def read_run(path: str) -> dict:
    """{"x_axis": "consumed tokens" or "iteration", "series": {tag: {"x": [...], "y": [...]}}} of one run."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    tb = events_dir(path)
    accumulator = EventAccumulator(tb, size_guidance={SCALARS: 0})  # 0: keep every event
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    if not tags:
        raise ValueError(f"{tb}: no tensorboard scalars (is it the --tensorboard-dir of a run?)")
    by_step = {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in tags}  # latest value per step
    tokens = by_step.pop(TOKENS, None)
    series = {}
    for tag, values in by_step.items():
        steps = sorted(s for s in values if tokens is None or s in tokens)
        series[tag] = {"x": [tokens[s] if tokens else s for s in steps], "y": [values[s] for s in steps]}
    return {"x_axis": "consumed tokens" if tokens else "iteration", "series": series}


def plot(runs: dict[str, dict], output: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    axes_name = {run["x_axis"] for run in runs.values()}
    x_label = axes_name.pop() if len(axes_name) == 1 else "consumed tokens (iteration where not logged)"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, wanted) in zip(axes.flat, PANELS):
        for i, (label, run) in enumerate(runs.items()):
            for pattern, style in wanted:
                tags = sorted(t for t in run["series"] if (t.startswith(pattern) if pattern.endswith("/") else t == pattern))
                for tag in tags:
                    s = run["series"][tag]
                    ax.plot(s["x"], s["y"], style, color=colors[i % len(colors)], markersize=3,
                            label=f"{label} {tag}" if len(wanted) > 1 else label)
        ax.set_title(title)
        ax.set_xlabel(x_label)
        if title == "loss":
            ax.set_ylabel("loss")
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="plot_runs.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_TB_DIR", help="run directories or tensorboard dirs")
    parser.add_argument("--output", default="runs.png", help="the PNG to write (default: runs.png)")
    parser.add_argument("--labels", nargs="+", help="a name per run (default: the directory names)")
    parser.add_argument("--json", metavar="FILE", help="also write the plotted series as JSON")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        raise ValueError(f"--labels gives {len(args.labels)} names for {len(args.runs)} runs")
    runs = {}
    for i, path in enumerate(args.runs):
        label = args.labels[i] if args.labels else run_name(path)
        runs[label if label not in runs else f"{label} ({i + 1})"] = read_run(path)
    plot(runs, args.output)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f)
    print(f"wrote {args.output}" + (f" and {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))

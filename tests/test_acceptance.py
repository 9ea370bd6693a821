"""The GPU acceptance command resolves on a CPU: `bash benchmarks/gpu/acceptance.sh --dry-run` runs every step at
tiny shapes and writes the JSON and the markdown table a GPU run writes (benchmarks/gpu/acceptance.py)."""
import glob
import json
import os
import subprocess
import sys

from conftest import REPO

STEPS = ["kernels", "fp8-numerics", "mfu", "attention", "max-length", "bitnet", "yoco", "graph-breaks"]


def test_acceptance_dry_run_runs_every_step_and_writes_its_record(tmp_path):
    proc = subprocess.run(["bash", "benchmarks/gpu/acceptance.sh", "--dry-run", "--output-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [json_path] = glob.glob(str(tmp_path / "acceptance-dry-run-*.json"))
    with open(json_path) as f:
        record = json.load(f)
    assert record["environment"]["dry_run"] is True
    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == STEPS
    for name, step in steps.items():
        assert step["status"] == "ok", f"{name}: {step['log_tail']}"
        assert step["command"].startswith("python ")
    assert "passed" in steps["kernels"]["summary"] and "4 passed" in steps["fp8-numerics"]["summary"]
    runs = steps["mfu"]["result"]["records"]
    assert [r.get("error") for r in runs] == [None] * 3
    assert "--fp8-format" in runs[2]["flags"] and "--compile" in runs[1]["flags"]
    assert runs[1]["losses"] == runs[0]["losses"]  # compiled = eager (fp32, same data)
    kinds = {(r["length"], r["kind"]) for r in steps["attention"]["result"]["records"] if "ms" in r}
    assert {(256, "dilated"), (512, "dilated"), (512, "dense")} <= kinds
    assert steps["max-length"]["result"]["max_trainable_length"] == {"dilated": 256}
    assert steps["bitnet"]["result"]["latency"]["tiny"]["packed_ms"] > 0
    assert all({"yoco", "gpt"} <= set(row) for row in steps["yoco"]["result"]["records"])
    assert "gpt: 1 graph(s), 0 break(s)" in steps["graph-breaks"]["summary"]
    with open(json_path[:-len(".json")] + ".md") as f:
        table = f.read()
    assert "| step | status | s | result |" in table
    assert all(f"| {name} | ok |" in table for name in STEPS)

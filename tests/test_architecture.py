"""The architecture's rules, read from the source (README, "Code map"):

- packages import only downward, in LAYERS order;
- shared modules name no model family (a family's code lives in megalatent/families/ and megalatent/models/);
- model and building-block code is single-device PyTorch: no collectives, process groups or DTensors;
- no module keeps mutable state at module level (registries are immutable mappings built at import).
"""
import ast
import os
import re
import tokenize

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "megalatent")
KERNELS = os.path.join(REPO, "kernels")  # installed as megalatent.kernels

# Bottom to top. A module may import its own package and any package listed before it.
LAYERS = [
    {"__init__", "formats", "config", "cli"},
    {"nn"},
    {"kernels"},
    {"models"},
    {"data"},
    {"distributed"},
    {"training"},
    {"families"},
    {"interop"},
    {"inference"},
    {"pretrain"},
    {"planning"},
    {"__main__"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}

FAMILY_NAMES = re.compile(r"latentlm|yoco|longvit|bitnet|longnet|mhmoe", re.IGNORECASE)
SHARED = ["config.py", "pretrain.py", "training", "distributed", "data/gpt_data.py", "inference", "planning"]


def modules():
    """(package, path) of every module of megalatent and its kernels."""
    for root, package_of in ((PACKAGE, None), (KERNELS, "kernels")):
        for directory, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(directory, f)
                    rel = os.path.relpath(path, root).split(os.sep)
                    yield package_of or (rel[0][:-3] if len(rel) == 1 else rel[0]), path


def imported_packages(path):
    """The megalatent packages a module imports, anywhere in it (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "megalatent" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_is_in_a_layer():
    assert {package for package, _ in modules()} <= set(LEVEL), "add the new package to LAYERS (and the README)"


def test_packages_import_only_downward():
    upward = [f"{os.path.relpath(path, REPO)} ({package}) imports megalatent.{target}"
              for package, path in modules() for target in imported_packages(path)
              if target != package and LEVEL[target] >= LEVEL[package]]
    assert not upward, "\n".join(upward)


def test_shared_modules_name_no_family():
    hits = []
    for entry in SHARED:
        root = os.path.join(PACKAGE, entry)
        paths = [root] if root.endswith(".py") else [os.path.join(d, f) for d, _, fs in os.walk(root)
                                                     for f in fs if f.endswith(".py")]
        for path in paths:
            for number, line in enumerate(open(path), 1):
                if FAMILY_NAMES.search(line):
                    hits.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


DISTRIBUTED_NAMES = {"distributed", "dist", "DTensor", "DeviceMesh", "device_mesh", "ProcessGroup", "all_reduce",
                     "all_gather", "all_to_all", "reduce_scatter", "broadcast", "new_group", "get_rank",
                     "get_world_size", "to_local", "full_tensor"}


def code_names(path):
    """(line, name) of every name in a module's code: strings (docstrings) and comments left out."""
    with open(path, "rb") as f:
        return [(t.start[0], t.string) for t in tokenize.tokenize(f.readline) if t.type == tokenize.NAME]


@pytest.mark.parametrize("folder", ["models", "nn"])
def test_model_code_is_single_device(folder):
    hits = [f"{os.path.relpath(path, REPO)}:{line}: {name}"
            for directory, _, files in os.walk(os.path.join(PACKAGE, folder)) for f in files if f.endswith(".py")
            for path in [os.path.join(directory, f)] for line, name in code_names(path) if name in DISTRIBUTED_NAMES]
    assert not hits, "\n".join(hits)


MUTATORS = {"append", "extend", "insert", "update", "setdefault", "add", "pop", "popitem", "clear", "remove",
            "discard"}


def mutated_module_state(source: str) -> list[str]:
    """Module-level names bound to a dict, list or set that the module's code changes (an item assigned or
    deleted, a mutating method called), and `global` statements."""
    tree = ast.parse(source)
    containers = set()
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if value is not None else []
        if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and getattr(value.func, "id", None) in ("dict", "list", "set")):
            containers.update(t.id for t in targets if isinstance(t, ast.Name))
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            hits.append(f"{node.lineno}: global {', '.join(node.names)}")
        target = None
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            for t in node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                    target = t.value.id
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS \
                and isinstance(node.func.value, ast.Name):
            target = node.func.value.id
        if target in containers:
            hits.append(f"{node.lineno}: {target} is module state, changed here")
    return hits


def test_no_mutable_module_state():
    hits = [f"{os.path.relpath(path, REPO)}:{hit}" for _, path in modules() for hit in mutated_module_state(open(path).read())]
    assert not hits, "\n".join(hits)


def test_the_state_check_finds_a_module_cache():
    """The check above would have caught the process-group cache the dilated attention kept in a global."""
    source = "_GROUPS: dict = {}\n\ndef group(ranks):\n    if ranks not in _GROUPS:\n        _GROUPS[ranks] = 1\n"
    assert mutated_module_state(source) == ["5: _GROUPS is module state, changed here"]
    assert mutated_module_state("NAMES = []\n\ndef f():\n    NAMES.append(1)\n")
    assert not mutated_module_state("TABLE = {'a': 1}\n\ndef f(x):\n    return TABLE[x]\n")


def test_no_module_caches_process_groups():
    """Process groups belong to the job's layout (ParallelLayout.subgroup), never to a module."""
    makers = {os.path.relpath(path, REPO) for _, path in modules() if re.search(r"\bdist\.new_group\(|"
                                                                              r"torch\.distributed\.new_group\(",
                                                                              open(path).read())}
    assert makers == {os.path.join("megalatent", "distributed", "layout.py")}


def test_the_readme_family_example_is_one_module_that_trains(tmp_path, monkeypatch):
    """README, "Adding a model family": its module, registered with one line, parses its flag, reports its rule,
    builds, trains a step through the shared trainer, and carries its parallel plan."""
    import sys

    import torch

    from megalatent import families
    from megalatent.config import ConfigError
    from megalatent.data.gpt_data import MicroBatchLoader
    from megalatent.distributed.layout import ParallelLayout
    from megalatent.pretrain import make_trainer

    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Adding a model family"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n")]
    (tmp_path / "swa_family.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    swa = __import__("swa_family")
    monkeypatch.setitem(families.FAMILIES, "swa", swa.FAMILY)  # the registration line
    monkeypatch.setitem(families.CONFIG_CLASSES, "swa", swa.FAMILY.config)

    argv = ["--model-family", "swa", "--num-layers", "2", "--hidden-size", "32", "--seq-length", "16",
            "--vocab-size", "64", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr-warmup-iters", "0"]
    with pytest.raises(ConfigError, match="--model-family swa needs --window >= 1"):
        families.validate(families.parse_args(argv))
    with pytest.raises(ConfigError, match="--window configures --model-family swa, not gpt"):
        families.validate(families.parse_args(["--window", "4"]))
    assert "--model-family swa:" in families.build_parser().format_help()
    cfg = families.parse_args(argv + ["--window", "4"])
    families.validate(cfg)
    torch.manual_seed(0)
    model = families.build_model(cfg.model)
    samples = [{"tokens": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,)),
                "loss_mask": torch.ones(16), "position_ids": torch.arange(16)} for _ in range(4)]
    loader = MicroBatchLoader(samples, 2, 2, 0, 1)
    trainer = make_trainer(cfg, ParallelLayout(world_size=1), torch.device("cpu"), [model], loader, None)
    loss, grad_norm = trainer.train_step(loader.next_global_batch())
    assert 3.0 < loss < 5.0 and grad_norm > 0  # about log(64) at initialisation
    assert trainer.cp_split == "contiguous" and swa.FAMILY.flops_per_token(cfg.model) > 0
    del sys.modules["swa_family"]

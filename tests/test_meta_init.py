"""A model built on the meta device, parallelized there and materialised per rank holds exactly the weights a
single process initialises (megalatent/nn/init.py keys every value by (seed, name, position)), at every
layout; and a rank never allocates more than its shards plus one layer's worth during construction."""
import torch

from test_parallel import run_worker

from conftest import REPO

WORKER = f"{REPO}/tests/init_worker.py"
MOE = {"num-experts": 4, "moe-ffn-hidden-size": 32, "moe-router-enable-expert-bias": True}


def check(results, layouts):
    for layout, result in zip(layouts, results):
        label = str(layout)
        weights, reference = result["weights"], result["reference"]
        assert weights.keys() == reference.keys(), label
        for name, value in reference.items():
            torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=f"{label}: {name}")
        # Tied embeddings under pipeline parallelism: the first and the last stage hold equal copies.
        copies = [c["embed_tokens.weight"] for c in result["copies"] if "embed_tokens.weight" in c]
        assert all(torch.equal(c, reference["embed_tokens.weight"]) for c in copies), label
        for rank, memory in enumerate(result["ranks"]):
            assert memory["peak"] <= memory["shards"] + result["largest_unit"], (label, rank, memory)


def test_two_ranks(tmp_path):
    layouts = [{"tensor-model-parallel-size": 2},
               {"pipeline-model-parallel-size": 2},  # tied embeddings on both end stages
               {"pipeline-model-parallel-size": 2, "untie-embeddings-and-output-weights": True},
               {"data-parallel-sharding-strategy": "optim_grads_params"},
               {"expert-model-parallel-size": 2, **MOE},
               {"context-parallel-size": 2}]
    check(run_worker(tmp_path, 2, layouts, "init2", WORKER), layouts)


def test_eight_ranks(tmp_path):
    layouts = [{"tensor-model-parallel-size": 2, "pipeline-model-parallel-size": 2, "sequence-parallel": True,
                "expert-model-parallel-size": 2, **MOE}]
    check(run_worker(tmp_path, 8, layouts, "init8", WORKER), layouts)

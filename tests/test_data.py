"""Tests of the data layer: tokenizer, preprocessing, Megatron file format, blending, batching."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megalatent.data.gpt_data import MicroBatchLoader, build_gpt_datasets, parse_data_path
from megalatent.data.preprocess import preprocess_files
from megalatent.data.stdlib_corpus import iter_stdlib_documents, prepare_default_corpus
from megalatent.data.tokenizer import Tokenizer, train_sentencepiece

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _load_fixture_module():
    spec = importlib.util.spec_from_file_location(
        "make_megatron_fixture", os.path.join(FIXTURES, "make_megatron_fixture.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_corpus():
    """A few stdlib files: enough text to train a small tokenizer in about a second."""
    return list(iter_stdlib_documents())[:20]


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory, small_corpus):
    return train_sentencepiece(small_corpus, str(tmp_path_factory.mktemp("tok") / "tok"), 600)


def test_tokenizer_training_is_deterministic(tmp_path, tokenizer_model, small_corpus):
    again = train_sentencepiece(small_corpus, str(tmp_path / "elsewhere" / "tok"), 600)
    for ext in (".model", ".vocab"):
        assert open(again[: -len(".model")] + ext, "rb").read() == open(
            tokenizer_model[: -len(".model")] + ext, "rb"
        ).read()


def _write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def test_tokenizer_and_preprocess_round_trip(tmp_path, tokenizer_model, small_corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.tokenizers import MegatronTokenizer

    tok = Tokenizer.load(tokenizer_model)
    assert tok.vocab_size == 600 and tok.pad != tok.eod
    # The metadata written beside the model lets megatron-core load the same tokenizer.
    megatron_tok = MegatronTokenizer.from_pretrained(tokenizer_model)
    assert megatron_tok.tokenize(small_corpus[0]) == tok.encode(small_corpus[0])
    jsonl_texts = small_corpus[:6] + ["", "unicode: héllo ☃ 中文 \t\r\n  trailing  "]
    _write_jsonl(tmp_path / "a.jsonl", jsonl_texts)
    (tmp_path / "b.txt").write_text(small_corpus[6], encoding="utf-8")

    prefixes = preprocess_files(
        [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")],
        str(tmp_path / "out"),
        tokenizer_model,
        workers=2,
        progress=False,
    )
    assert prefixes == [str(tmp_path / "out_text_document")]
    assert sorted(os.listdir(tmp_path)) == [
        "a.jsonl", "b.txt", "out_text_document.bin", "out_text_document.idx"
    ]

    dataset = IndexedDataset(prefixes[0])
    expected = [t for t in jsonl_texts if t] + [small_corpus[6]]  # empty documents are skipped
    assert len(dataset) == len(expected)
    assert dataset[0].dtype == np.uint16
    for ids, text in zip(dataset, expected):
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1]) == text

    no_eod = preprocess_files(
        [str(tmp_path / "b.txt")], str(tmp_path / "raw"), tokenizer_model, append_eod=False,
        progress=False,
    )
    # Arrays from an IndexedDataset view its memory map, which dies with it: keep it referenced.
    raw = IndexedDataset(no_eod[0])
    assert tok.eod not in raw[0].tolist() and tok.decode(raw[0]) == small_corpus[6]


def test_preprocess_rejects_bad_jsonl(tmp_path, tokenizer_model):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    message = r"bad.jsonl:2: expected a JSON object with string fields \['text'\]"
    with pytest.raises(ValueError, match=message):
        preprocess_files(
            [str(tmp_path / "bad.jsonl")], str(tmp_path / "o"), tokenizer_model, progress=False
        )
    assert not any(name.startswith("o_") for name in os.listdir(tmp_path))


def test_blend_follows_weights(tmp_path, tokenizer_model, small_corpus):
    prefixes = []
    for name, texts in (("a", small_corpus[:10]), ("b", small_corpus[10:])):
        _write_jsonl(tmp_path / f"{name}.jsonl", texts)
        prefixes += preprocess_files(
            [str(tmp_path / f"{name}.jsonl")], str(tmp_path / name), tokenizer_model, progress=False
        )
    data_prefixes, weights = parse_data_path(["0.3", prefixes[0], "0.7", prefixes[1]])
    args = (data_prefixes, weights)
    rest = (64, 1234, Tokenizer.load(tokenizer_model), (2000, 100, 100))
    # 10 documents split 90/5/5 leave no test document; megatron-core would loop forever.
    with pytest.raises(ValueError, match=r"leaves the test split of .*a_text_document empty"):
        build_gpt_datasets(*args, "90,5,5", *rest, cache_dir=None)
    train, valid, test = build_gpt_datasets(*args, "80,20,0", *rest, cache_dir=None)
    assert len(train) == 2000 and len(valid) == 100 and test is None
    share_a = float(np.mean(train.dataset_index == 0))
    assert abs(share_a - 0.3) < 0.01
    sample = train[0]
    assert sample["tokens"].shape == (64,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_megatron_fixture_loads(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    fixture = _load_fixture_module()
    prefix = os.path.join(FIXTURES, "megatron_fixture_text_document")
    # The committed files are what the generator writes.
    fixture.write_fixture(str(tmp_path / "regen"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"regen{ext}").read_bytes() == open(prefix + ext, "rb").read()

    indexed = IndexedDataset(prefix)
    assert [doc.tolist() for doc in indexed] == fixture.DOCUMENTS
    assert indexed.document_indices.tolist() == list(range(len(fixture.DOCUMENTS) + 1))

    seq = 8
    tokenizer = SimpleNamespace(
        vocab_size=fixture.VOCAB_SIZE, eod=fixture.EOD, pad=fixture.VOCAB_SIZE - 2,
        unique_identifiers={"class": "fixture"},
    )
    train, valid, test = build_gpt_datasets(
        *parse_data_path([prefix]), "100,0,0", seq, 7, tokenizer, (10, 0, 0), cache_dir=None
    )
    assert valid is None and test is None
    # GPTDataset concatenates documents in the order of its (shuffled) document index; sample k
    # before shuffling is tokens [k * seq, (k + 1) * seq] of that stream.
    stream = np.concatenate([fixture.DOCUMENTS[d] for d in train.document_index])
    counts = np.bincount(train.document_index, minlength=len(fixture.DOCUMENTS))
    assert len(set(counts.tolist())) == 1  # every document once per epoch
    for i in range(len(train)):
        k = train.shuffle_index[i]
        window = torch.from_numpy(stream[k * seq : (k + 1) * seq + 1].astype(np.int64))
        assert torch.equal(train[i]["tokens"], window[:-1])
        assert torch.equal(train[i]["labels"], window[1:])

    loader = MicroBatchLoader(train, micro_batch_size=2, global_batch_size=4, dp_rank=0, dp_size=1)
    batches = loader.next_global_batch()
    assert [b["tokens"].shape for b in batches] == [(2, seq), (2, seq)]
    assert batches[1]["tokens"].dtype == torch.int64
    assert batches[1]["loss_mask"].dtype == torch.float32
    assert torch.equal(batches[1]["tokens"][0], train[2]["tokens"])
    assert torch.equal(batches[1]["position_ids"][1], torch.arange(seq))


class _IndexDataset:
    """Sample g is a sequence of g's, so a batch shows which samples it holds."""

    def __len__(self):
        return 50

    def __getitem__(self, g):
        return {
            "tokens": torch.full((3,), g), "labels": torch.full((3,), g),
            "loss_mask": torch.ones(3), "position_ids": torch.arange(3),
        }


def _sample_ids(batches):
    return [int(t) for b in batches for t in b["tokens"][:, 0]]


def test_micro_batch_loader_partitions_and_resumes():
    dataset = _IndexDataset()
    single = MicroBatchLoader(dataset, 2, 8, dp_rank=0, dp_size=1, consumed_samples=44)
    ranks = [
        MicroBatchLoader(dataset, 2, 8, dp_rank=r, dp_size=2, consumed_samples=44) for r in range(2)
    ]
    for _ in range(3):
        expected = _sample_ids(single.next_global_batch())
        per_rank = [_sample_ids(loader.next_global_batch()) for loader in ranks]
        assert sorted(per_rank[0] + per_rank[1]) == sorted(expected)
    # Megatron's sampler order: micro-batch m of rank r starts at c + (m * dp + r) * mbs;
    # the dataset has 50 samples, so sample 60 is sample 10.
    assert per_rank == [[10, 11, 14, 15], [12, 13, 16, 17]]
    assert single.state_dict() == {"consumed_samples": 68}

    resumed = MicroBatchLoader(dataset, 2, 8, dp_rank=1, dp_size=2)
    resumed.load_state_dict(ranks[1].state_dict())
    for _ in range(2):
        assert _sample_ids(resumed.next_global_batch()) == _sample_ids(ranks[1].next_global_batch())

    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        MicroBatchLoader(dataset, 3, 8, dp_rank=0, dp_size=1)


def test_parse_data_path(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = str(tmp_path / "d_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)  # one document: the files must be sound
    builder.add_document(np.array([5, 6, 2], dtype=np.uint16), [3])
    builder.finalize(prefix + ".idx")
    assert parse_data_path([prefix]) == ([prefix], None)
    assert parse_data_path([prefix, prefix]) == ([prefix, prefix], None)
    assert parse_data_path(["3", prefix, "1e0", prefix]) == ([prefix, prefix], [3.0, 1.0])

    with pytest.raises(ValueError, match=r"a weight before every prefix"):
        parse_data_path(["0.5", prefix, prefix])
    with pytest.raises(ValueError, match=r"a weight before every prefix"):
        parse_data_path([prefix, "0.5"])
    with pytest.raises(ValueError, match=r"weight of .* is 0; weights must be positive"):
        parse_data_path(["0", prefix, "1", prefix])
    message = r"missing_text_document\.bin not found.*tools/preprocess_data\.py"
    with pytest.raises(ValueError, match=message):
        parse_data_path([str(tmp_path / "missing_text_document")])
    os.remove(prefix + ".idx")
    with pytest.raises(ValueError, match=r"d_text_document\.idx not found"):
        parse_data_path([prefix])


def test_gpt_datasets_cache_with_process_group(tmp_path, tokenizer_model, small_corpus, caplog):
    """With a process group, rank 0 saves the indices to cache_dir and a rebuild loads them."""
    import torch.distributed as dist

    caplog.set_level(logging.INFO, logger="megatron.core.datasets")

    _write_jsonl(tmp_path / "a.jsonl", small_corpus[:5])
    prefixes = preprocess_files(
        [str(tmp_path / "a.jsonl")], str(tmp_path / "a"), tokenizer_model, progress=False
    )
    tokenizer = Tokenizer.load(tokenizer_model)
    args = (prefixes + prefixes, [1.0, 1.0], "100,0,0", 32, 1, tokenizer, (50, 0, 0))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        first = build_gpt_datasets(*args, cache_dir=str(tmp_path / "cache"))[0]
        assert "Build and save the GPTDataset train indices" in caplog.text
        caplog.clear()
        cached = sorted(os.listdir(tmp_path / "cache"))
        second = build_gpt_datasets(*args, cache_dir=str(tmp_path / "cache"))[0]
        assert "Load the GPTDataset train indices" in caplog.text
        assert "Build and save" not in caplog.text
    finally:
        dist.destroy_process_group()
    assert any(name.endswith("GPTDataset-train-shuffle_index.npy") for name in cached)
    assert any(name.endswith("BlendedDataset-train-dataset_index.npy") for name in cached)
    assert sorted(os.listdir(tmp_path / "cache")) == cached
    assert torch.equal(first[7]["tokens"], second[7]["tokens"])


def test_prepare_default_corpus_concurrent(tmp_path):
    """Two processes build the full stdlib corpus at once: one builds, the other waits and reuses.

    A tokenizer left without a data index (a killed build) must not count as a cache.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cache_dir = tmp_path / "cache"
    directory = cache_dir / f"stdlib-py{version}-vocab8192"
    directory.mkdir(parents=True)
    (directory / "tokenizer.model").write_bytes(b"left by a killed build")

    code = (
        "from megalatent.data.stdlib_corpus import prepare_default_corpus; "
        f"print(repr(prepare_default_corpus({str(cache_dir)!r})))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert sum(err.count("building the default corpus") for _, err in outputs) == 1
    results = {out.strip() for out, _ in outputs}
    assert len(results) == 1
    assert not [name for name in os.listdir(directory) if ".tmp-" in name]

    model_path, data_prefix = prepare_default_corpus(str(cache_dir))  # cached: returns at once
    assert repr((model_path, data_prefix)) in results
    tok = Tokenizer.load(model_path)
    assert tok.vocab_size == 8192
    dataset = IndexedDataset(data_prefix)
    first_doc = next(text for text in iter_stdlib_documents() if text)
    assert len(dataset) == sum(1 for text in iter_stdlib_documents() if text)
    assert dataset[0][-1] == tok.eod and tok.decode(dataset[0][:-1]) == first_doc

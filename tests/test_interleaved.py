"""Interleaved text+image documents (megalatent/data/interleaved.py): the writer's token stream and latent store
read back through megatron-core's GPTDataset as LATENT_LM samples, window by window (including windows that
start or end inside an image); a blend reads each sample's latents from its own store; the clear errors; and
tools/preprocess_interleaved.py on the digits demo and on JSONL with image files."""
import json
import os

import numpy as np
import pytest
import torch

from megalatent.data.interleaved import (
    InterleavedDataset, LatentStore, build_interleaved_datasets, latent_base, open_latent_stores, special_tokens,
    store_paths, vocab_size, write_interleaved,
)
from megalatent.data.interleaved_sources import iter_jsonl_documents, scan_jsonl
from megalatent.models.sigma_vae import SigmaVAE, SigmaVAEConfig, load_tokenizer, save_tokenizer

from launcher import launch
SEED = 7


def make_vae_dir(path, latent_dim=4, hidden_size=16, mean=0.0):
    """An untrained σ-VAE tokenizer of 8 x 8 grey images: 4 latents of width `latent_dim`."""
    torch.manual_seed(0)
    vae = SigmaVAE(SigmaVAEConfig(image_size=8, patch_size=4, latent_dim=latent_dim, hidden_size=hidden_size,
                                  num_layers=1))
    vae.set_latent_stats(torch.full((latent_dim,), mean), torch.ones(latent_dim), 1)
    save_tokenizer(vae, str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(σ-VAE tokenizer dir, a tiny SentencePiece text tokenizer)."""
    from megalatent.data.tokenizer import Tokenizer, train_sentencepiece

    root = tmp_path_factory.mktemp("tokenizers")
    lines = [f"a handwritten {w}. the cat sat on the mat {i}; hello world, an image of a dog."
             for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])]
    model = train_sentencepiece(lines * 20, str(root / "text"), vocab_size=320)
    return make_vae_dir(root / "vae"), Tokenizer.load(model)


def images(n, seed):
    return list(torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1)


def hand_made_documents():
    img = images(5, 0)
    docs = [["hello world"],  # text only
            [img[0]],  # one image
            ["the cat ", img[1], " sat on the mat"],  # text, image, text
            [img[2], img[3]],  # images only
            ["a dog", img[4]]]
    return docs, torch.stack(img)


def expected_stream(docs, tokenizer, latents):
    """Per document, its (stored id, latent or None) pairs, built from the layout rules alone."""
    ids, base, t = special_tokens(tokenizer.vocab_size), latent_base(tokenizer.vocab_size), latents.shape[1]
    out, image = [], 0
    for doc in docs:
        entries = []
        for segment in doc:
            if isinstance(segment, str):
                entries += [(i, None) for i in tokenizer.encode(segment)]
            else:
                entries.append((ids["boi"], None))
                entries += [(base + image * t + j, latents[image, j]) for j in range(t)]
                entries.append((ids["eoi"], None))
                image += 1
        out.append(entries + [(tokenizer.eod, None)])
    return out


def check_windows(dataset: InterleavedDataset, docs_entries, tokenizer, seq_length):
    """Every sample equals the window megatron-core's indices point at, decoded from `docs_entries`."""
    gpt = dataset.dataset
    ids, pad = special_tokens(tokenizer.vocab_size), tokenizer.pad
    gpt[0]  # builds the lazily loaded indices
    stream = [e for d in gpt.document_index for e in docs_entries[d]]
    starts = np.cumsum([0] + [len(docs_entries[d]) for d in gpt.document_index])
    k = dataset.latent_dim
    seen = {"starts_in_image": 0, "ends_in_image": 0}
    for i in range(len(dataset)):
        doc, offset = gpt.sample_index[gpt.shuffle_index[i]]
        start = starts[doc] + offset
        window = stream[start:start + seq_length + 1]
        window += [(pad, None)] * (seq_length + 1 - len(window))
        sample = dataset[i]
        for j in range(seq_length):
            (tid, tz), (lid, lz) = window[j], window[j + 1]
            token = ids["latent"] if tz is not None else (0 if tid == pad else tid)
            label = ids["latent"] if lz is not None else (0 if lid == pad else lid)
            assert sample["tokens"][j] == token and sample["labels"][j] == label, (i, j)
            assert sample["latent_mask"][j] == (tz is not None)
            torch.testing.assert_close(sample["latents"][j], tz if tz is not None else torch.zeros(k))
            torch.testing.assert_close(sample["target_latents"][j], lz if lz is not None else torch.zeros(k))
            assert sample["diffusion_mask"][j] == (lz is not None)
            assert sample["loss_mask"][j] == (lz is None and lid != pad)
        assert sample["position_ids"].tolist() == list(range(seq_length))
        seen["starts_in_image"] += window[0][1] is not None and window[1][1] is not None
        seen["ends_in_image"] += window[seq_length - 1][1] is not None and window[seq_length][1] is not None
    return seen


def test_layout_ids():
    assert special_tokens(100) == {"boi": 100, "eoi": 101, "latent": 102}
    assert vocab_size(100) == 103 and latent_base(100) == 103


def test_round_trip_every_window(tmp_path, tokenizers):
    vae_dir, tokenizer = tokenizers
    docs, imgs = hand_made_documents()
    summary = write_interleaved(docs, str(tmp_path / "mixed"), tokenizer, vae_dir, seed=SEED)
    # The VAE's sampled latents of the images, in document order, one batch, one generator from the seed.
    latents = load_tokenizer(vae_dir).tokenize(imgs, sample=True, generator=torch.Generator().manual_seed(SEED))
    entries = expected_stream(docs, tokenizer, latents)
    assert (summary.documents, summary.images, summary.latent_rows) == (5, 5, 20)
    assert summary.tokens == sum(map(len, entries))
    assert all(os.path.isfile(f) for f in summary.files) and not [f for f in os.listdir(tmp_path) if ".tmp" in f]

    from megatron.core.datasets.indexed_dataset import IndexedDataset
    indexed = IndexedDataset(summary.data_prefix)
    assert indexed.index.dtype == np.int32
    for d, doc in enumerate(entries):  # the token stream, document by document
        assert indexed[d].tolist() == [i for i, _ in doc]
    store = LatentStore(summary.data_prefix)
    torch.testing.assert_close(torch.from_numpy(np.array(store.latents)), latents.reshape(-1, 4))

    seq_length = 5
    train, valid = build_interleaved_datasets([summary.data_prefix], None, "100,0,0", seq_length, seed=3,
                                              tokenizer=tokenizer, num_samples=(40, 0, 0), cache_dir=None,
                                              latent_tokenizer=vae_dir)
    assert valid is None and len(train) >= 40
    seen = check_windows(train, entries, tokenizer, seq_length)
    assert seen["starts_in_image"] and seen["ends_in_image"], seen

    # Deterministic: the same call writes the same bytes.
    again = write_interleaved(docs, str(tmp_path / "again"), tokenizer, vae_dir, seed=SEED)
    for a, b in zip(summary.files[:3], again.files[:3]):
        assert open(a, "rb").read() == open(b, "rb").read()

    # Ids past int32 (announced by num_images) are stored as int64 and read back the same way.
    wide = write_interleaved(docs, str(tmp_path / "wide"), tokenizer, vae_dir, seed=SEED, num_images=2 ** 31)
    assert IndexedDataset(wide.data_prefix).index.dtype == np.int64
    train, _ = build_interleaved_datasets([wide.data_prefix], None, "100,0,0", seq_length, 3, tokenizer,
                                          (10, 0, 0), None, vae_dir)
    check_windows(train, entries, tokenizer, seq_length)

    # The samples pickle (DataLoader workers) without copying the store, and read the same after.
    import pickle
    clone = pickle.loads(pickle.dumps(train))
    assert isinstance(clone.stores[0].latents, np.memmap)
    torch.testing.assert_close(clone[1], train[1])


def test_blend_reads_each_samples_latents_from_its_own_store(tmp_path, tokenizers):
    vae_dir, tokenizer = tokenizers
    a = write_interleaved([["a cat", img] for img in images(6, 1)], str(tmp_path / "a"), tokenizer, vae_dir, seed=1)
    b = write_interleaved([[img, "a dog"] for img in images(9, 2)], str(tmp_path / "b"), tokenizer, vae_dir, seed=2)
    stores = open_latent_stores([b.data_prefix, a.data_prefix], vae_dir, tokenizer)  # any order
    from megalatent.data.gpt_data import build_gpt_datasets
    train, _, _ = build_gpt_datasets([a.data_prefix, b.data_prefix], [0.5, 0.5], "100,0,0", 6, 3, tokenizer,
                                     (30, 0, 0), None)
    dataset = InterleavedDataset(train, stores)
    by_prefix = {s.data_prefix: s for s in stores}
    seen = set()
    for i in range(len(dataset)):
        raw, sample = train[i], dataset[i]
        store = by_prefix[(a.data_prefix, b.data_prefix)[raw["dataset_id"]]]
        seen.add(int(raw["dataset_id"]))
        rows = raw["tokens"][raw["tokens"] >= store.latent_base] - store.latent_base
        torch.testing.assert_close(sample["latents"][sample["latent_mask"]], store.gather(rows.numpy()))
    assert seen == {0, 1}


def test_errors(tmp_path, tokenizers):
    vae_dir, tokenizer = tokenizers
    from megalatent.data.preprocess import encode_to_indexed_datasets
    text_only = encode_to_indexed_datasets([{"text": "hello"}], str(tmp_path / "text"), tokenizer.model_path,
                                           progress=False)[0]
    with pytest.raises(FileNotFoundError, match="made by tools/preprocess_interleaved.py"):
        LatentStore(text_only)

    prefix = write_interleaved([["a cat", img] for img in images(3, 0)], str(tmp_path / "s"), tokenizer, vae_dir,
                               seed=0).data_prefix
    store = LatentStore(prefix)
    store.check(vae_dir, tokenizer)
    with pytest.raises(ValueError, match="latent_dim: --latent-tokenizer .* has 8, the store 4"):
        store.check(make_vae_dir(tmp_path / "wide", latent_dim=8))
    with pytest.raises(ValueError, match=r"fingerprint.*hidden_size \(16 -> 32\)"):
        store.check(make_vae_dir(tmp_path / "other", hidden_size=32))
    with pytest.raises(ValueError, match="fingerprint.*other latent statistics"):
        store.check(make_vae_dir(tmp_path / "restat", mean=0.5))
    from megalatent.data.tokenizer import Tokenizer, train_sentencepiece
    other_text = Tokenizer.load(train_sentencepiece(["some other text, with other pieces"] * 50,
                                                    str(tmp_path / "other_text"), vocab_size=290))
    with pytest.raises(ValueError, match="text vocabulary: --tokenizer-model .* has 290 ids, the store was made "
                                         "with 320"):
        store.check(text_tokenizer=other_text)

    # A token stream paired with another run's (smaller) store: caught at the first latent beyond its rows.
    small = write_interleaved([["a cat", img] for img in images(1, 0)], str(tmp_path / "small"), tokenizer, vae_dir,
                              seed=0).data_prefix
    for src, dst in zip(store_paths(small), store_paths(prefix)):
        os.replace(src, dst)
    from megalatent.data.gpt_data import build_gpt_datasets
    train = build_gpt_datasets([prefix], None, "100,0,0", 30, 0, tokenizer, (1, 0, 0), None)[0]
    with pytest.raises(ValueError, match="beyond|do not belong together"):
        InterleavedDataset(train, [LatentStore(prefix)])[0]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"segments": [{"text": "ok"}]}\n{"segments": [{"text": "broken"\n')
    with pytest.raises(ValueError, match="docs.jsonl:2: invalid JSON"):
        scan_jsonl([str(jsonl)])
    jsonl.write_text('{"segments": [{"video": "x.mp4"}]}\n')
    with pytest.raises(ValueError, match='docs.jsonl:1: segment 0 .* a segment is {"text"'):
        scan_jsonl([str(jsonl)])
    jsonl.write_text('{"segments": [{"image": "missing.png"}]}\n')
    with pytest.raises(FileNotFoundError, match="missing.png not found"):
        scan_jsonl([str(jsonl)])
    with pytest.raises(ValueError, match=r"document 0: image values span \[0, 255\]"):
        write_interleaved([[torch.full((1, 8, 8), 255.0).index_fill_(1, torch.tensor([0]), 0.0)]],
                          str(tmp_path / "range"), tokenizer, vae_dir, seed=0)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("range")]  # nothing left behind


def run_tool(*args):
    out = launch(["tools/preprocess_interleaved.py", "--no-progress", *args], timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_tool_digits_demo_and_jsonl_with_images(tmp_path, tokenizers):
    from PIL import Image

    vae_dir, tokenizer = tokenizers
    common = ["--latent-tokenizer", vae_dir, "--tokenizer-model", tokenizer.model_path]
    stdout = run_tool("--demo", "digits", "--output-prefix", str(tmp_path / "digits"), *common)
    meta = json.load(open(str(tmp_path / "digits_text_document_latents.json")))
    assert meta["documents"] == meta["images"] == 1797 and meta["rows"] == 1797 * 4, meta
    assert "1797 documents" in stdout and "--data-path" in stdout
    captions = meta["tokens"] - 1797 * (4 + 2 + 1)  # text ids beside <boi>, 4 latents, <eoi>, eod
    assert 0 < captions and os.path.isfile(str(tmp_path / "digits_text_document.bin"))

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "g.png")
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"segments": [{"text": "a cat"}, {"image": "c.png"}, {"text": "sat"}]}) + "\n\n"
        + json.dumps({"segments": [{"image": "g.png"}]}) + "\n")
    run_tool("--input", str(tmp_path / "docs.jsonl"), "--output-prefix", str(tmp_path / "out" / "docs"),
             "--workers", "2", *common)
    store = LatentStore(str(tmp_path / "out" / "docs_text_document"))
    assert (store.meta["documents"], store.meta["images"], store.rows) == (2, 2, 8)
    store.check(vae_dir, tokenizer)
    # The same latents as the documents written in-process from the decoded files (order kept across workers).
    docs = list(iter_jsonl_documents([str(tmp_path / "docs.jsonl")], 8, 1))
    assert docs[0][0] == "a cat" and docs[0][1].shape == (1, 8, 8) and docs[1][0].abs().max() == 1  # black: -1
    again = write_interleaved(docs, str(tmp_path / "again"), tokenizer, vae_dir, seed=1234)
    torch.testing.assert_close(LatentStore(again.data_prefix).gather(np.arange(8)), store.gather(np.arange(8)))

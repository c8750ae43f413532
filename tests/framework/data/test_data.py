"""Data preparation, bad data inputs, and the sampler's determinism, sharding and resumability."""
import hashlib
import json

import numpy as np
import pytest
import torch

from framework.data.dataset import Sampler, TokenWindows, validation_batches
from framework.data.prepare import load_prepared, prepare, split_train_val


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    return prepare(str(corpus_dir), str(tmp_path_factory.mktemp("c")), 512, 0.1, 2_000_000)


def test_prepare_layout_and_roundtrip(prepared, corpus_dir):
    from tokenizers import Tokenizer

    meta = json.loads((prepared.folder / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16"
    train = np.memmap(prepared.train_bin, dtype="uint16", mode="r")
    val = np.memmap(prepared.val_bin, dtype="uint16", mode="r")
    assert len(train) == meta["num_train_tokens"] and len(val) == meta["num_val_tokens"] > 0
    assert train.max() < 512
    # documents end with the end-of-text token, and the tokenizer decodes the first document back to its text
    tok = Tokenizer.from_file(str(prepared.tokenizer))
    eot = meta["eot_id"]
    first_end = int(np.argmax(train == eot))
    first_doc = sorted(corpus_dir.iterdir())[0].read_text()
    assert tok.decode(train[:first_end].tolist()) == first_doc


def test_prepare_is_cached_and_deterministic(prepared, corpus_dir):
    again = prepare(str(corpus_dir), str(prepared.folder.parent), 512, 0.1, 2_000_000)
    assert again.folder == prepared.folder  # cache hit, nothing rebuilt
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    other = prepare(str(corpus_dir), str(prepared.folder.parent / "other"), 512, 0.1, 2_000_000)
    assert digest(other.train_bin) == digest(prepared.train_bin)


def test_bad_data_inputs(tmp_path, prepared):
    with pytest.raises(FileNotFoundError, match="data.path='.*missing'"):
        prepare(str(tmp_path / "missing"), str(tmp_path / "c"), 512, 0.1, 10**6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        prepare(str(tmp_path / "empty"), str(tmp_path / "c"), 512, 0.1, 10**6)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("   \n")
    with pytest.raises(ValueError, match="holds no non-empty document"):
        prepare(str(blank), str(tmp_path / "c"), 512, 0.1, 10**6)
    # pre-tokenized folder whose ids exceed its vocabulary
    bad = tmp_path / "bad_ids"
    bad.mkdir()
    np.array([1, 2, 900], dtype="uint16").tofile(bad / "train.bin")
    np.array([1, 2], dtype="uint16").tofile(bad / "val.bin")
    (bad / "meta.json").write_text(json.dumps({"vocab_size": 512, "dtype": "uint16"}))
    with pytest.raises(ValueError, match="token id 900 >= vocab_size=512"):
        prepare(str(bad), str(tmp_path / "c"), 512, 0.1, 10**6)
    # wrong dtype: a file whose size is not a whole number of uint32 tokens
    (bad / "meta.json").write_text(json.dumps({"vocab_size": 512, "dtype": "uint32"}))
    with pytest.raises(ValueError, match="not a multiple of uint32"):
        load_prepared(bad)
    # sequence longer than the data
    with pytest.raises(ValueError, match="train.seq_len=100000"):
        TokenWindows(prepared.val_bin, "uint16", 100000)


def test_user_pretokenized_folder(tmp_path):
    """nanoGPT layout: train.bin/val.bin + meta.json, used as is."""
    d = tmp_path / "pretok"
    d.mkdir()
    np.arange(1000, dtype="uint32").tofile(d / "train.bin")
    np.arange(100, dtype="uint32").tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps({"vocab_size": 1000, "dtype": "uint32"}))
    p = prepare(str(d), str(tmp_path / "c"), 512, 0.1, 10**6)
    w = TokenWindows(p.train_bin, p.dtype, 9)
    x, y = w.get(torch.tensor([3]))
    assert x.tolist() == [list(range(27, 36))] and y.tolist() == [list(range(28, 37))]


def test_sampler_deterministic_sharded_and_resumable(prepared):
    w = TokenWindows(prepared.train_bin, "uint16", 16)
    G, M = 8, 2
    full = Sampler(w, seed=7, global_batch=G, dp_rank=0, dp_size=1, micro_batches=M)
    shards = [Sampler(w, seed=7, global_batch=G, dp_rank=r, dp_size=2, micro_batches=M) for r in range(2)]
    steps = (3 * len(w)) // G + 2  # run past two epoch boundaries
    seen = []
    for step in range(steps):
        whole = torch.cat([x for x, _ in full.next_batch()])
        parts = [torch.cat([x for x, _ in s.next_batch()]) for s in shards]
        assert torch.equal(whole, torch.cat(parts)), step  # the two ranks split the global batch exactly
        seen.append(whole)
    # the same seed gives the same stream; another seed does not
    again = Sampler(w, seed=7, global_batch=G, dp_rank=0, dp_size=1, micro_batches=M)
    assert torch.equal(torch.cat([x for x, _ in again.next_batch()]), seen[0])
    other = Sampler(w, seed=8, global_batch=G, dp_rank=0, dp_size=1, micro_batches=M)
    assert not torch.equal(torch.cat([x for x, _ in other.next_batch()]), seen[0])
    # every window once per epoch: no sample skipped or repeated
    ids = full.sample_ids(0, 2 * len(w))
    assert sorted(ids[: len(w)].tolist()) == list(range(len(w)))
    assert sorted(ids[len(w):].tolist()) == list(range(len(w)))
    # resume from state: continues the exact stream
    resumed = Sampler(w, seed=7, global_batch=G, dp_rank=0, dp_size=1, micro_batches=M)
    resumed.load_state_dict({"samples_consumed": 5 * G, "seed": 7, "global_batch": G})
    assert torch.equal(torch.cat([x for x, _ in resumed.next_batch()]), seen[5])
    with pytest.raises(ValueError, match="train.seed=7"):
        resumed.load_state_dict({"samples_consumed": 0, "seed": 9, "global_batch": G})


def test_validation_batches_fixed(prepared):
    w = TokenWindows(prepared.val_bin, "uint16", 16)
    a, b = validation_batches(w, 3, 2), validation_batches(w, 3, 2)
    assert len(a) == 3 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in a)  # labels are the inputs shifted by one


def test_validation_set_is_the_same_for_any_layout(prepared):
    """Each data-parallel rank takes its contiguous share of every validation batch: put back together in rank order,
    the shares are the one-process set, window for window, whatever dp and micro_batches are."""
    w = TokenWindows(prepared.val_bin, "uint16", 16)
    G, B = 8, 3
    whole = torch.cat([x for x, _ in validation_batches(w, B, G)])
    assert whole.shape == (B * G, 16)
    for dp, micro in ((2, 1), (2, 2), (4, 2), (8, 1)):
        shares = [validation_batches(w, B, G, d, dp, micro) for d in range(dp)]
        assert all(len(s) == B * micro and all(len(x) == G // (dp * micro) for x, _ in s) for s in shares)
        per_batch = [torch.cat([x for x, _ in s[b * micro:(b + 1) * micro]]) for b in range(B) for s in shares]
        assert torch.equal(torch.cat(per_batch), whole), (dp, micro)
    # a split smaller than the set repeats windows, still spread evenly (torch.linspace over the window ids)
    few = validation_batches(w, 4, len(w))
    assert sum(len(x) for x, _ in few) == 4 * len(w)


def test_small_corpora_are_split_by_tokens():
    docs = [np.arange(5), np.arange(10, 17), np.arange(20, 23)]            # 15 tokens in 3 documents
    # fewer documents than 1/val_fraction: the last val_fraction of the token stream, at least one token
    s = split_train_val(docs, 0.05)
    assert np.array_equal(np.concatenate(s["train"]), np.concatenate(docs)[:14])
    assert np.array_equal(np.concatenate(s["val"]), [22])
    s = split_train_val(docs, 0.25)                                          # round(0.25 * 15) = 4 tokens
    assert np.array_equal(np.concatenate(s["val"]), [16, 20, 21, 22])
    s = split_train_val([np.arange(40)], 0.1)                                # a single file
    assert np.array_equal(s["train"][0], np.arange(36)) and np.array_equal(s["val"][0], np.arange(36, 40))
    # enough documents: every k-th whole document, as before
    s = split_train_val(docs + [np.arange(30, 32)], 0.25)
    assert [d.tolist() for d in s["val"]] == [[30, 31]] and len(s["train"]) == 3


def test_token_files_are_checked_against_meta_json(tmp_path):
    d = tmp_path / "prepared"
    d.mkdir()
    np.arange(7, dtype="uint16").tofile(d / "train.bin")                      # cut short: 7 of 10 tokens
    np.arange(4, dtype="uint16").tofile(d / "val.bin")
    meta = {"vocab_size": 512, "dtype": "uint16", "num_train_tokens": 10, "num_val_tokens": 4, "max_id": 9}
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"train.bin: 14 bytes but meta.json says num_train_tokens=10 \(20 bytes of "
                                         r"uint16\): truncated or replaced"):
        load_prepared(d)
    # the right size, but an id beyond the vocabulary that meta.json's max_id does not admit: refused when read
    np.array([1, 2, 3, 4, 5, 6, 7, 8, 700, 9], dtype="uint16").tofile(d / "train.bin")
    p = load_prepared(d)
    w = TokenWindows(p.train_bin, p.dtype, 4, p.vocab_size)
    assert w.get(torch.tensor([0]))[0].tolist() == [[1, 2, 3, 4]]
    with pytest.raises(ValueError, match=r"train.bin: token id 700 >= vocab_size=512 \(meta.json\) at position 8"):
        w.get(torch.tensor([1]))

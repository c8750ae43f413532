"""Own tokenizer and own data: the same documents as a text folder, JSONL and Parquet give the same token files, equal
to the tokenizers library's own encoding; weighted mixing; bad inputs named in one line with exit status 2."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from framework.data import sources
from framework.data.prepare import prepare
from tests.framework.hf_folder import documents, make_tokenizer

VAL = 0.1


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The same 60 documents three ways (a text folder, one JSONL, two Parquet files) and a tokenizer folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("own")
    docs = documents()
    make_tokenizer(root / "tok", docs[:20])
    (root / "text").mkdir()
    for i, d in enumerate(docs):
        (root / "text" / f"{i:03d}.txt").write_text(d)
    (root / "jsonl").mkdir()
    with open(root / "jsonl" / "docs.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "body": d}) + "\n")
    (root / "parquet").mkdir()
    for part, rows in enumerate((docs[:25], docs[25:])):   # two files, read in record batches
        pq.write_table(pa.table({"id": list(range(len(rows))), "body": rows}), root / "parquet" / f"{part}.parquet",
                       row_group_size=7)
    return root, docs


def tokens(p) -> tuple[np.ndarray, np.ndarray]:
    return np.fromfile(p.train_bin, dtype=p.dtype), np.fromfile(p.val_bin, dtype=p.dtype)


def test_text_jsonl_parquet_give_the_tokenizers_encoding(own, tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    root, docs = own
    tok = str(root / "tok")
    text = prepare(str(root / "text"), str(tmp_path), 4096, VAL, 10**7, tokenizer=tok)
    monkeypatch.setattr(sources, "BATCH_DOCS", 7)   # batch boundaries anywhere: same stream
    jsonl = prepare(str(root / "jsonl"), str(tmp_path), 4096, VAL, 10**7, tokenizer=tok, text_field="body")
    parquet = prepare(str(root / "parquet" ), str(tmp_path), 4096, VAL, 10**7, tokenizer=tok, text_field="body")
    # the reference: <s> + the library's encoding + </s> per document (tokenizer_config: add_bos_token), every
    # 10th document held out
    t = Tokenizer.from_file(str(root / "tok" / "tokenizer.json"))
    bos, eos = t.token_to_id("<s>"), t.token_to_id("</s>")
    ref = {"train": [], "val": []}
    for i, d in enumerate(docs):
        ref["val" if i % 10 == 9 else "train"] += [bos] + t.encode(d, add_special_tokens=False).ids + [eos]
    for p in (text, jsonl, parquet):
        train, val = tokens(p)
        assert train.tolist() == ref["train"] and val.tolist() == ref["val"], p.folder
        assert p.vocab_size == t.get_vocab_size() and p.eot_id == eos
        meta = json.loads((p.folder / "meta.json").read_text())
        assert meta["num_documents"] == 60 and (p.folder / "tokenizer_config.json").is_file()
    assert len({text.folder, jsonl.folder, parquet.folder}) == 3


def test_cap_and_bpe_path_agree_across_formats(own, tmp_path):
    """Without a tokenizer a BPE is trained; a byte cap cuts every format at the same place."""
    root, docs = own
    cap = sum(len(d.encode()) for d in docs[:30]) + 100   # the 31st document is cut after 100 bytes
    a = prepare(str(root / "text"), str(tmp_path), 300, VAL, cap)
    b = prepare(str(root / "parquet"), str(tmp_path), 300, VAL, cap, text_field="body")
    assert [x.tolist() for x in tokens(a)] == [x.tolist() for x in tokens(b)]
    assert json.loads((b.folder / "meta.json").read_text())["num_documents"] == 31


def test_mix_shares_and_determinism(own, tmp_path):
    root, _ = own
    tok = str(root / "tok")
    (root / "small").mkdir(exist_ok=True)
    for i in range(6):
        (root / "small" / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * (i + 3))
    mix = [{"path": str(root / "text"), "weight": 1}, {"path": str(root / "small"), "weight": 3}]
    p = prepare(None, str(tmp_path), 4096, 0.25, 10**7, tokenizer=tok, mix=mix)
    meta = json.loads((p.folder / "meta.json").read_text())
    parts = [prepare(m["path"], str(tmp_path), 4096, 0.25, 10**7, tokenizer=tok) for m in mix]
    sizes = [len(tokens(q)[0]) for q in parts]
    train, val = tokens(p)
    assert len(train) >= sum(sizes) and len(val) == sum(len(tokens(q)[1]) for q in parts)
    longest = max(np.diff(np.concatenate(([0], sources._doc_ends(q.folder, "train")))).max() for q in parts)
    for share, want in zip((m["train_tokens"] for m in meta["mix"]), (0.25, 0.75)):
        assert abs(share - want * len(train)) <= longest   # within one document of the exact share
    # the small source is repeated to reach its share: its documents come back whole, in order
    small = tokens(parts[1])[0]
    assert meta["mix"][1]["train_tokens"] > 3 * len(small)
    again = prepare(None, str(tmp_path / "again"), 4096, 0.25, 10**7, tokenizer=tok, mix=mix)
    assert tokens(again)[0].tobytes() == train.tobytes()


def test_mix_order_follows_the_weights():
    docs = [np.array([5, 5, 5]), np.array([2, 2])]
    order = sources.mix_order(docs, [1.0, 1.0], 20)
    # equal weights: the source behind in tokens goes next (ties: the first), cycling its documents;
    # tokens taken (a, b): (5,0) (5,2) (5,4) (5,6) (10,6) (10,8) (10,10) = 20
    assert order == [(0, 0), (1, 0), (1, 1), (1, 0), (0, 1), (1, 1), (1, 0)]


def prepare_cli(capsys, monkeypatch, *args: str) -> tuple[int, list[str]]:
    """`python -m launch.prepare_data args` in this process: (exit status, stderr lines)."""
    from launch import prepare_data

    monkeypatch.setattr(sys, "argv", ["prepare_data", *args])
    with pytest.raises(SystemExit) as exit_:
        prepare_data.main()
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


def test_bad_inputs_one_line_exit_2(own, tmp_path, capsys, monkeypatch):
    root, _ = own
    (tmp_path / "empty").mkdir()
    cache = tmp_path / "cache"
    cases = [
        ([f"data.tokenizer={tmp_path / 'missing'}"], "data.tokenizer="),
        ([f"data.tokenizer={tmp_path / 'empty'}"], "no tokenizer.json"),
        ([f"data.tokenizer={root / 'tok'}", f"data.path={root / 'jsonl'}", "data.text_field=text"],
         "data.text_field='text'.*no such field.*body"),
        ([f"data.tokenizer={root / 'tok'}", f"data.path={root / 'parquet'}", "data.text_field=text"],
         "data.text_field='text'.*no such column.*body"),
        ([f"data.tokenizer={root / 'tok'}", f"data.mix=[{{path:{root / 'text'},weight:-1}}]"],
         r"data.mix\[0\].weight=-1"),
        ([f"data.tokenizer={root / 'tok'}", f"data.mix=[{{path:{root / 'text'},weight:1}},{{path:{root},wieght:1}}]"],
         r"data.mix\[1\]"),
        ([f"data.mix=[{{path:{root / 'text'},weight:1}}]"], "data.mix.*needs data.tokenizer"),
    ]
    for args, pattern in cases:
        code, lines = prepare_cli(capsys, monkeypatch, *args, f"data.cache_dir={cache}")
        assert code == 2 and len(lines) == 1, (args, lines)
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert not cache.exists() or not any(cache.iterdir())   # nothing half-written

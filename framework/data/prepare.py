"""Turn a text source into a tokenizer + memmapped token files, once.

Layout of a prepared folder (also what `data.path` may point to, nanoGPT style):
  train.bin, val.bin   flat token ids, uint16 when the vocabulary fits, else uint32
  meta.json            {"vocab_size", "dtype", "eot_id", "num_train_tokens", "num_val_tokens", "max_id", ...}
  tokenizer.json       the byte-level BPE (tokenizers library); absent for pre-tokenized user data
Documents are separated by an end-of-text token; train/val are split by whole documents (every k-th document is
held out, k = 1/data.val_fraction, so both halves see every part of the corpus). A corpus of fewer than k documents
(down to a single file) is split by tokens instead: the last val_fraction of its token stream is held out. The folder is written under a temporary name and renamed,
so an interrupted preparation never leaves a half-written cache behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from framework.data.corpus import read_documents, source_fingerprint, stdlib_files, text_files

EOT = "<|endoftext|>"


@dataclass
class Prepared:
    folder: Path
    vocab_size: int
    dtype: str
    eot_id: int

    @property
    def train_bin(self) -> Path:
        return self.folder / "train.bin"

    @property
    def val_bin(self) -> Path:
        return self.folder / "val.bin"

    @property
    def tokenizer(self) -> Path:
        return self.folder / "tokenizer.json"


def _token_dtype(vocab_size: int, requested: str) -> str:
    if requested != "auto":
        if requested == "uint16" and vocab_size > 2**16:
            raise ValueError(f"data.dtype='uint16': cannot hold vocab_size={vocab_size}; use uint32 or auto")
        return requested
    return "uint16" if vocab_size <= 2**16 else "uint32"


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def load_prepared(folder: str | Path) -> Prepared:
    """Open a prepared (or user pre-tokenized, nanoGPT layout) folder, checking it is usable."""
    folder = Path(folder)
    for name in ("train.bin", "val.bin"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"data.path={str(folder)!r}: missing {name} (a prepared folder holds train.bin, val.bin, meta.json)")
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"data.path={str(folder)!r}: missing meta.json with vocab_size and dtype")
    try:
        meta = json.loads(meta_path.read_text())
        vocab, dtype = int(meta["vocab_size"]), meta.get("dtype", "uint16")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: unreadable metadata ({e}); expected JSON with vocab_size and dtype") from None
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"{meta_path}: dtype={dtype!r}: allowed uint16, uint32")
    itemsize = np.dtype(dtype).itemsize
    for name, count_key in (("train.bin", "num_train_tokens"), ("val.bin", "num_val_tokens")):
        size = (folder / name).stat().st_size
        expected = meta.get(count_key)
        if expected is not None and size != int(expected) * itemsize:
            raise ValueError(f"{folder / name}: {size} bytes but meta.json says {count_key}={expected} "
                             f"({int(expected) * itemsize} bytes of {dtype}): truncated or replaced; prepare it again "
                             f"(delete {folder}) or fix meta.json")
        if size == 0:
            raise ValueError(f"{folder / name}: empty token file")
        if size % itemsize:
            raise ValueError(f"{folder / name}: size {size} is not a multiple of {dtype} ({itemsize} bytes): wrong dtype?")
    max_id = meta.get("max_id")
    if max_id is None:  # user data: check once, in chunks
        for name in ("train.bin", "val.bin"):
            position, token = first_token_at_least(folder / name, dtype, vocab)
            if position is not None:
                raise ValueError(f"{folder / name}: token id {token} >= vocab_size={vocab} of meta.json "
                                 f"(at position {position})")
    elif max_id >= vocab:
        raise ValueError(f"{folder}: token id {max_id} >= vocab_size={vocab} in meta.json")
    return Prepared(folder, vocab, dtype, int(meta.get("eot_id", -1)))


def first_token_at_least(path: Path, dtype: str, limit: int, chunk: int = 1 << 24) -> tuple[int | None, int | None]:
    """(position, id) of the first token id >= limit in a token file, read in chunks; (None, None) if there is none."""
    tokens = np.memmap(path, dtype=dtype, mode="r")
    for start in range(0, len(tokens), chunk):
        part = tokens[start:start + chunk]
        bad = np.flatnonzero(part >= limit)
        if bad.size:
            return start + int(bad[0]), int(part[bad[0]])
    return None, None


def split_train_val(docs: list[np.ndarray], val_fraction: float) -> dict[str, list[np.ndarray]]:
    """Every k-th document to validation (k = round(1/val_fraction)); with fewer than k documents, the last
    val_fraction of the token stream (at least one token)."""
    every = max(2, round(1 / val_fraction))
    if len(docs) >= every:
        return {"train": [d for i, d in enumerate(docs) if i % every != every - 1],
                "val": [d for i, d in enumerate(docs) if i % every == every - 1]}
    stream = np.concatenate(docs)
    cut = len(stream) - max(1, round(val_fraction * len(stream)))
    return {"train": [stream[:cut]], "val": [stream[cut:]]}


def prepare(path: str | None, cache_dir: str, vocab_size: int, val_fraction: float, max_bytes: int,
            dtype: str = "auto", tokenizer: str | None = None, text_field: str = "text",
            mix: list | None = None) -> Prepared:
    """Return the prepared folder for this source, building it if it is not cached yet."""
    if path is not None and Path(path).is_dir() and (Path(path) / "train.bin").exists():
        return load_prepared(path)
    from framework.data import sources  # a given tokenizer, JSONL / Parquet records, mixtures: streamed

    if mix:
        return sources.prepare_mix(mix, cache_dir, tokenizer, text_field, val_fraction, max_bytes, dtype)
    if tokenizer is not None or sources.has_records(path):
        return sources.prepare_source(path, cache_dir, tokenizer, text_field, val_fraction, max_bytes, dtype,
                                      vocab_size)
    if path is not None and Path(path).suffix == ".bin":
        raise ValueError(f"data.path={path!r}: point at the folder holding train.bin, val.bin and meta.json, not at a .bin file")
    files = stdlib_files() if path is None else text_files(path)
    key = hashlib.sha256(json.dumps([source_fingerprint(files), vocab_size, val_fraction, max_bytes, dtype]).encode())
    folder = Path(cache_dir) / f"{'stdlib' if path is None else Path(path).name}-{key.hexdigest()[:12]}"
    if (folder / "meta.json").is_file():
        return load_prepared(folder)

    docs = read_documents(files, max_bytes)
    if not docs:
        raise ValueError(f"data.path={path!r}: holds no non-empty document")
    tok = train_tokenizer(docs, vocab_size)
    eot = tok.token_to_id(EOT)
    real_vocab = tok.get_vocab_size()
    tdtype = _token_dtype(vocab_size, dtype)
    encoded = [np.asarray(enc.ids + [eot], dtype=tdtype) for enc in tok.encode_batch(docs)]
    splits = split_train_val(encoded, val_fraction)
    if splits["train"][0].size == 0:
        raise ValueError(f"data.path={path!r}: too little text to split ({splits['val'][0].size} tokens)")

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        counts = {}
        for split, arrs in splits.items():
            ids = np.concatenate(arrs)
            ids.tofile(tmp / f"{split}.bin")
            counts[split] = int(ids.size)
        tok.save(str(tmp / "tokenizer.json"))
        meta = {"vocab_size": vocab_size, "tokenizer_vocab_size": real_vocab, "dtype": tdtype, "eot_id": eot,
                "num_train_tokens": counts["train"], "num_val_tokens": counts["val"], "max_id": real_vocab - 1,
                "num_documents": len(docs), "source": "stdlib" if path is None else str(path)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_prepared(folder)

"""Documents from text folders, JSONL and Parquet files, tokenized in a stream; weighted mixtures of sources.

A source (`data.path`) is a file or a folder (files taken in sorted order):
  *.jsonl     one document per line: a JSON object whose `data.text_field` holds the text
  *.parquet   one document per row of the `data.text_field` column, read in record batches with pyarrow
  other text  one document per file (the suffixes of framework.data.corpus)
The stream is cut at `data.max_bytes` of text (the document crossing the cap is truncated there, as the text path
does), every k-th document is held out for validation, and tokens go to train.bin / val.bin batch by batch: memory
stays bounded by one batch of documents whatever the size of the source. The prepared folder has the layout of
framework/data/prepare.py plus train.idx / val.idx (uint64 end offset of every document), which mixing reads.

`data.mix=[{path, weight, text_field?}, ...]` prepares each source on its own (cached), then writes a train stream
in which source i holds weight_i / sum(weights) of the tokens: documents are taken whole, always from the source
furthest below its share (ties: the first listed), each source cycling through its documents when its share
exceeds what it has. The total equals the sources' train tokens together. Nothing is random, so the same
configuration gives the same bytes. Validation is every source's held-out documents, in order.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from framework.data.corpus import TEXT_SUFFIXES, source_fingerprint

RECORD_SUFFIXES = (".jsonl", ".parquet")
BATCH_DOCS = 256          # documents tokenized together
MIX_KEYS = ("path", "weight", "text_field")


def _fail(key: str, value, allowed: str):
    from framework.config import ConfigError
    raise ConfigError(f"{key}={value!r}: {allowed}")


def validate_sources(d, m=None) -> None:
    """data.tokenizer / data.text_field / data.mix checks that need no reading beyond a folder listing."""
    if not d.text_field:
        _fail("data.text_field", d.text_field, "must name the field (JSONL) or column (Parquet) holding the text")
    if d.tokenizer is not None:
        p = Path(d.tokenizer)
        if not p.exists():
            _fail("data.tokenizer", d.tokenizer, "no such folder or file (a Hugging Face tokenizer folder or its "
                  "tokenizer.json)")
        if p.is_dir() and not (p / "tokenizer.json").is_file():
            _fail("data.tokenizer", d.tokenizer, "the folder has no tokenizer.json")
    if d.mix is None:
        return
    if d.path is not None:
        _fail("data.path", d.path, "set either data.path or data.mix (the mix names its own paths)")
    if d.tokenizer is None:
        _fail("data.mix", "[...]", "needs data.tokenizer: the sources must share one vocabulary")
    if len(d.mix) == 0:
        _fail("data.mix", [], "a non-empty list of {path, weight}")
    for i, item in enumerate(d.mix):
        key = f"data.mix[{i}]"
        if not hasattr(item, "keys") or "path" not in item or "weight" not in item:
            _fail(key, item, "must be {path: <file or folder>, weight: <number > 0>, text_field: <optional>}")
        unknown = sorted(set(item.keys()) - set(MIX_KEYS))
        if unknown:
            _fail(f"{key}.{unknown[0]}", item[unknown[0]], f"unknown key; allowed: {', '.join(MIX_KEYS)}")
        w = item["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            _fail(f"{key}.weight", w, "must be a finite number > 0")
        if not Path(str(item["path"])).exists():
            _fail(f"{key}.path", item["path"], "no such file or folder")


# ---------------------------------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------------------------------

def source_files(path: str, key: str = "data.path") -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{key}={path!r}: no such file or folder")
    if p.is_file():
        return [p]
    suffixes = tuple(dict.fromkeys(TEXT_SUFFIXES + RECORD_SUFFIXES))
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"{key}={path!r}: folder holds no documents (suffixes {', '.join(suffixes)})")
    return files


def has_records(path: Optional[str]) -> bool:
    """True when the source holds JSONL or Parquet files (which the BPE-only text path cannot read)."""
    p = Path(path) if path is not None else None
    if p is None or not p.exists():
        return False
    files = [p] if p.is_file() else (f for f in p.rglob("*") if f.is_file())
    return any(f.suffix.lower() in RECORD_SUFFIXES for f in files)


def jsonl_rows(f: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed row) of each non-blank line of a JSONL file; a line that is not JSON is named."""
    with open(f, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{n}: not JSON ({e.msg})") from None
            yield n, row


def _jsonl_texts(f: Path, field: str) -> Iterator[str]:
    for n, row in jsonl_rows(f):
        if not isinstance(row, dict) or field not in row:
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"data.text_field={field!r}: {f}:{n} has no such field (it has: {keys})")
        text = row[field]
        if not isinstance(text, str):
            raise ValueError(f"data.text_field={field!r}: {f}:{n} holds a {type(text).__name__}, not text")
        yield text


def _parquet_texts(f: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"data.text_field={field!r}: {f} has no such column (it has: {', '.join(names)})")
    for batch in pf.iter_batches(columns=[field], batch_size=BATCH_DOCS):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"data.text_field={field!r}: {f} column holds {type(text).__name__}, not text")
            yield text or ""


def iter_texts(files: list[Path], text_field: str) -> Iterator[str]:
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_texts(f, text_field)
        elif suffix == ".parquet":
            yield from _parquet_texts(f, text_field)
        else:
            yield f.read_bytes().decode("utf-8", errors="replace")


def iter_documents(files: list[Path], text_field: str, max_bytes: int) -> Iterator[tuple[str, int]]:
    """(document, its utf-8 bytes) in order until max_bytes; the document crossing the cap is cut there."""
    total = 0
    for text in iter_texts(files, text_field):
        if total >= max_bytes:
            return
        raw = text.encode("utf-8")
        if total + len(raw) > max_bytes:
            raw = raw[: max_bytes - total]
            text = raw.decode("utf-8", errors="replace")
        if text.strip():
            total += len(raw)
            yield text, len(raw)


# ---------------------------------------------------------------------------------------------------------------------
# Writing the token stream
# ---------------------------------------------------------------------------------------------------------------------

def _progress(total_bytes: int, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn(f"tokenizing {label}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=False)


class _TokenFile:
    """Appends token arrays and document end offsets."""

    def __init__(self, folder: Path, split: str, dtype: str):
        self.bin = open(folder / f"{split}.bin", "wb")
        self.idx = open(folder / f"{split}.idx", "wb")
        self.dtype, self.count, self.max_id = dtype, 0, -1

    def write(self, ids: np.ndarray) -> None:
        ids.astype(self.dtype, copy=False).tofile(self.bin)
        self.count += int(ids.size)
        self.max_id = max(self.max_id, int(ids.max()) if ids.size else -1)
        np.asarray([self.count], dtype=np.uint64).tofile(self.idx)

    def close(self) -> None:
        self.bin.close()
        self.idx.close()


def _publish(tmp: Path, folder: Path) -> None:
    """The finished temporary folder becomes the cache entry, atomically; a concurrent twin wins quietly."""
    if folder.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)


@contextlib.contextmanager
def _staged(folder: Path):
    """A temporary folder next to `folder` to write a cache entry into, with the entry's meta dict: on success the
    meta is written and the folder published (_publish); on any failure it is removed, nothing half-written stays."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    meta: dict = {}
    try:
        yield tmp, meta
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _token_dtype(vocab_size: int, requested: str) -> str:
    from framework.data.prepare import _token_dtype as pick
    return pick(vocab_size, requested)


def _bpe_for(files: list[Path], text_field: str, vocab_size: int, max_bytes: int):
    """No tokenizer given: train the byte-level BPE of the text path on the documents (held in memory, capped)."""
    from framework.data.prepare import EOT, train_tokenizer

    docs = [t for t, _ in iter_documents(files, text_field, max_bytes)]
    if len(docs) < 2:
        raise ValueError(f"data.path: needs at least 2 non-empty documents (found {len(docs)}) to split train/val")
    bpe = train_tokenizer(docs, vocab_size)
    return bpe, bpe.token_to_id(EOT)


def prepare_source(path: Optional[str], cache_dir: str, tokenizer: Optional[str], text_field: str,
                   val_fraction: float, max_bytes: int, dtype: str = "auto", vocab_size: int = 4096,
                   key: str = "data.path"):
    """Tokenize one source (None: the embedded corpus) into a cached prepared folder (see the module doc);
    returns prepare.Prepared."""
    from framework.data.corpus import stdlib_files
    from framework.data.hf_tokenizer import load_tokenizer
    from framework.data.prepare import load_prepared

    files = stdlib_files() if path is None else source_files(path, key)
    name = "stdlib" if path is None else Path(path).name
    hf = load_tokenizer(tokenizer) if tokenizer is not None else None
    tok_id = hf.fingerprint() if hf is not None else f"bpe{vocab_size}"
    digest = hashlib.sha256(json.dumps([source_fingerprint(files), tok_id, text_field, val_fraction, max_bytes,
                                        dtype, 1]).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"{name}-{digest}"
    if (folder / "meta.json").is_file():
        return load_prepared(folder)

    if hf is not None:
        encode, eos, vocab = hf.encode_documents, hf.eos_id, hf.vocab_size
    else:
        bpe, eos = _bpe_for(files, text_field, vocab_size, max_bytes)
        vocab = bpe.get_vocab_size()
        encode = lambda texts: [e.ids + [eos] for e in bpe.encode_batch(texts)]  # noqa: E731
    tdtype = _token_dtype(max(vocab, vocab_size if hf is None else 0), dtype)
    every = max(2, round(1 / val_fraction))
    total = min(max_bytes, sum(f.stat().st_size for f in files))
    with _staged(folder) as (tmp, meta):
        out = {"train": _TokenFile(tmp, "train", tdtype), "val": _TokenFile(tmp, "val", tdtype)}
        n_docs, batch = 0, []

        def flush():
            nonlocal n_docs
            for ids in encode(batch):
                out["val" if n_docs % every == every - 1 else "train"].write(np.asarray(ids, dtype=np.int64))
                n_docs += 1
            batch.clear()

        with _progress(total, name) as bar:
            task = bar.add_task("", total=total)
            for text, size in iter_documents(files, text_field, max_bytes):
                batch.append(text)
                bar.advance(task, size)
                if len(batch) == BATCH_DOCS:
                    flush()
            flush()
            bar.update(task, completed=total)   # the estimate counts file bytes (JSON escapes, Parquet encoding)
        for f in out.values():
            f.close()
        if n_docs < 2 or out["train"].count == 0 or out["val"].count == 0:
            raise ValueError(f"{key}={path!r}: needs at least 2 non-empty documents (found {n_docs}) to split "
                             f"train/val")
        if hf is not None:
            for f in hf.files:
                shutil.copy(f, tmp / f.name)
        else:
            bpe.save(str(tmp / "tokenizer.json"))
        meta.update({"vocab_size": vocab if hf is not None else vocab_size, "tokenizer_vocab_size": vocab,
                      "dtype": tdtype, "eot_id": eos, "bos_id": hf.bos_id if hf else None,
                      "num_train_tokens": out["train"].count, "num_val_tokens": out["val"].count,
                      "max_id": max(out["train"].max_id, out["val"].max_id), "num_documents": n_docs,
                      "source": "stdlib" if path is None else str(path), "text_field": text_field,
                      "tokenizer": str(tokenizer) if tokenizer is not None else "bpe"})
    return load_prepared(folder)


def _doc_ends(folder: Path, split: str) -> np.ndarray:
    return np.fromfile(folder / f"{split}.idx", dtype=np.uint64).astype(np.int64)


def mix_order(doc_tokens: list[np.ndarray], weights: list[float], total: int) -> list[tuple[int, int]]:
    """(source, document) in mixing order until `total` tokens: always the source furthest below its share."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    taken = np.zeros(len(w))
    nxt = [0] * len(w)
    order, produced = [], 0
    while produced < total:
        i = int(np.argmin(taken / w))
        d = nxt[i] % len(doc_tokens[i])
        nxt[i] += 1
        n = int(doc_tokens[i][d])
        order.append((i, d))
        taken[i] += n
        produced += n
    return order


def prepare_mix(mix, cache_dir: str, tokenizer: str, text_field: str, val_fraction: float, max_bytes: int,
                dtype: str = "auto"):
    """Prepare every source of data.mix, then the mixed folder (see the module doc)."""
    from framework.data.prepare import load_prepared

    parts = [prepare_source(str(m["path"]), cache_dir, tokenizer, str(m.get("text_field") or text_field),
                            val_fraction, max_bytes, dtype, key=f"data.mix[{i}].path") for i, m in enumerate(mix)]
    weights = [float(m["weight"]) for m in mix]
    digest = hashlib.sha256(json.dumps([[p.folder.name for p in parts], weights]).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"mix-{digest}"
    if (folder / "meta.json").is_file():
        return load_prepared(folder)
    metas = [json.loads((p.folder / "meta.json").read_text()) for p in parts]
    dtypes = {p.dtype for p in parts}
    tdtype = "uint32" if "uint32" in dtypes else "uint16"
    with _staged(folder) as (tmp, meta):
        train = _TokenFile(tmp, "train", tdtype)
        ends = [_doc_ends(p.folder, "train") for p in parts]
        starts = [np.concatenate(([0], e[:-1])) for e in ends]
        tokens = [np.memmap(p.train_bin, dtype=p.dtype, mode="r") for p in parts]
        total = sum(int(e[-1]) for e in ends)
        per_source = [0] * len(parts)
        for i, d in mix_order([e - s for e, s in zip(ends, starts)], weights, total):
            piece = np.asarray(tokens[i][starts[i][d]:ends[i][d]])
            train.write(piece)
            per_source[i] += int(piece.size)
        train.close()
        val = _TokenFile(tmp, "val", tdtype)
        for p in parts:
            val.write(np.fromfile(p.val_bin, dtype=p.dtype))
        val.close()
        shutil.copytree(parts[0].folder, tmp, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if n.endswith((".bin", ".idx")) or n == "meta.json"])
        shared = ("vocab_size", "tokenizer_vocab_size", "eot_id", "bos_id", "tokenizer")
        meta.update({**{k: metas[0][k] for k in shared},
                      "dtype": tdtype, "num_train_tokens": train.count, "num_val_tokens": val.count,
                      "max_id": max(m["max_id"] for m in metas),
                      "mix": [{"source": m["source"], "weight": w, "train_tokens": n, "share": n / max(1, train.count)}
                              for m, w, n in zip(metas, weights, per_source)]})
    return load_prepared(folder)

"""Text sources: the embedded default corpus (this interpreter's standard library) or the user's own files."""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".html", ".c", ".h", ".tex")


def stdlib_files() -> list[Path]:
    """Sorted .py files of the running interpreter's standard library (no site-packages): same list on every run."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_files(path: str) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data.path={path!r}: no such file or folder")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"data.path={path!r}: folder holds no text files (suffixes {', '.join(TEXT_SUFFIXES)})")
    return files


def read_documents(files: list[Path], max_bytes: int) -> list[str]:
    """One document per file, in order, until max_bytes of text have been read. Undecodable bytes are replaced."""
    docs, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        text = f.read_bytes()[: max_bytes - total].decode("utf-8", errors="replace")
        if text.strip():
            docs.append(text)
            total += len(text.encode("utf-8"))
    return docs


def source_fingerprint(files: list[Path]) -> str:
    """Names, sizes and mtimes: a cache of prepared tokens is reused only for the same source."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]

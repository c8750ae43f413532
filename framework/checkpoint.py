"""Atomic, resumable checkpoints on torch.distributed.checkpoint (DCP).

A checkpoint is a folder `step_00000100/` holding DCP's shards and `.metadata` plus our `meta.json` (step, sampler
and LR-schedule state, the resolved config, the size and sha256 of every file). It is written as
`step_00000100.tmp/` by all ranks, then renamed by rank 0 once complete; `latest` (a one-line file replaced
atomically) is updated last and the oldest folders beyond `keep` are pruned after that. So a crash at any point
leaves the previous checkpoint intact and selected. A folder whose files do not match the sizes and checksums in its
meta.json (truncated, corrupted, partly deleted) is reported naming the file; `resume=auto` then falls back to the
previous complete one.

Loading trusts no byte of the folder: a checksum only proves that the files are the ones meta.json names, and both
could have been written by someone else. DCP pickles its `.metadata`; we read it with an unpickler that builds only
DCP's metadata classes, torch dtypes and sizes (anything else is refused before it runs), check that every tensor
we load is stored as a tensor in one of the checksummed files, and let DCP read the shards with
torch.load(weights_only=True). A load plan that asks for pickled bytes is refused.
Tensors are keyed by the model's fully-qualified names: a tensor held by several ranks (data-parallel replicas)
is written once, and a pipeline rank loads only the keys of the stages it holds, so the layout can change on resume.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pathlib
import pickle  # only through _MetadataUnpickler, which refuses every class but DCP's metadata
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from framework import faults

FORMAT_VERSION = 2              # 2: a sha256 of every file
_CHUNK = 1 << 20


EXPERT_SLICE = re.compile(r"^(?P<name>.+)@experts(?P<start>\d+)-(?P<stop>\d+)$")


def expert_slice_key(name: str, experts: range) -> str:
    """The checkpoint name of an expert-parallel rank's slice [E/ep, ...] of a stacked expert tensor: every ep rank
    holds other experts under the same model name, and DCP writes one tensor per name, so the name carries the range
    (`layers.1.mlp.experts.w@experts4-8`). A resume with the same ep finds its own slice; export stacks them."""
    return f"{name}@experts{experts.start}-{experts.stop}"


class CheckpointError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_table(folder: Path) -> dict[str, dict]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != "meta.json"}


# -- reading DCP metadata without running anyone's code -----------------------------------------------------------
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n): getattr(dcp_md, n)
    for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
              "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")}
_METADATA_CLASSES.update({
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_fs._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,   # a name -> torch.strided etc.
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,     # StorageMeta.checkpoint_id: kept as a pure path
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("collections", "OrderedDict"): collections.OrderedDict,
})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES:
            return _METADATA_CLASSES[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


def read_metadata(folder: str | Path) -> dcp_md.Metadata:
    """DCP's `.metadata` of a checkpoint folder, unpickled with only DCP's metadata classes allowed."""
    path = Path(folder) / ".metadata"
    try:
        md = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder}: file .metadata is missing") from None
    except Exception as e:   # refused class, truncated or random bytes: never executed, always one line
        raise CheckpointError(f"checkpoint {folder}: file .metadata is not DCP metadata ({e})") from None
    if not isinstance(md, dcp_md.Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"checkpoint {folder}: file .metadata is not DCP metadata ({type(md).__name__})")
    return md


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader handing DCP the metadata we read and checked (never re-reading a file that may have changed
    since); shards are read by DCP with torch.load(weights_only=True)."""

    def __init__(self, path: str | Path, md: dcp_md.Metadata):
        super().__init__(str(path))
        self.checked = md

    def read_metadata(self, *args, **kwargs) -> dcp_md.Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"checkpoint {self.path}: per-rank metadata files are not supported")
        md = self.checked
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_md.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP loads non-tensor entries with torch.load(weights_only=False): a checkpoint never gets to ask for that."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is pickled bytes, not a tensor: refused")


def check_storage(folder: Path, md: dcp_md.Metadata, keys, files: dict) -> None:
    """Every key we load is a tensor, stored only in files that meta.json checksums (no path leaves the folder)."""
    for k in keys:
        if k in md.state_dict_metadata and not isinstance(md.state_dict_metadata[k], dcp_md.TensorStorageMetadata):
            raise CheckpointError(f"checkpoint {folder}: entry {k!r} is not stored as a tensor: refused")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or rel not in files or Path(rel).name != rel:
            raise CheckpointError(f"checkpoint {folder}: .metadata points at {rel!r}, not a checksummed file of the "
                                  f"folder: refused")


def load_tensors(folder: str | Path, tensors: dict[str, torch.Tensor], md: dcp_md.Metadata | None = None) -> None:
    """dcp.load into `tensors` through the safe reader and planner. Collective when a process group is up."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    md = md if md is not None else read_metadata(folder)
    check_storage(folder, md, tensors.keys(), meta.get("files", {}))
    try:
        dcp.load(tensors, storage_reader=SafeReader(folder, md), planner=_TensorsOnlyPlanner(),
                 no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:   # a shard that is not what .metadata says (not a tensor pickle:
        raise CheckpointError(f"checkpoint {folder}: reading its shards failed ({_cause(e)})") from None  # refused)


def _cause(e: BaseException) -> str:
    """One line for an error, looking through DCP's CheckpointException (which wraps each rank's exception)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        _, inner = sorted(failures.items())[0]
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            e = inner
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def check_complete(folder: Path) -> dict:
    """meta.json of a complete, untruncated checkpoint, or CheckpointError saying what is wrong."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {folder}: no meta.json (incomplete or not a duet checkpoint)")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: file meta.json is corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {folder}: file meta.json is corrupt (not a JSON object)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {folder}: format_version={meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    want = meta.get("files")
    if not isinstance(want, dict) or ".metadata" not in want:
        raise CheckpointError(f"checkpoint {folder}: meta.json lists no files")
    for name, entry in want.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: file {name} is missing")
        size = path.stat().st_size
        if not isinstance(entry, dict) or size != entry.get("bytes"):
            raise CheckpointError(f"checkpoint {folder}: file {name} has {size} bytes, expected "
                                  f"{entry.get('bytes') if isinstance(entry, dict) else '?'} (truncated?)")
        if _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {folder}: file {name} does not match its sha256 in meta.json (corrupt)")
    md = read_metadata(folder)                  # parsed without running anything, before anyone else reads it
    check_storage(folder, md, md.state_dict_metadata.keys(), want)
    return meta


class Checkpointer:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def folder(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))

    def _pointed(self, candidates: list[Path], say) -> Optional[Path]:
        """The folder `latest` names, if it names one of the candidates; a garbage pointer is ignored, said once."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        text = pointer.read_bytes()[:256].decode("utf-8", "replace").strip()
        named = self.root / text if text and Path(text).name == text else None
        if named in candidates:
            return named
        say(f"resume: ignoring {pointer}: names {text[:60]!r}, not a checkpoint folder of {self.root}")
        return None

    def latest(self, verbose: bool = True) -> Optional[Path]:
        """Newest valid checkpoint: the `latest` pointer if valid, else the newest folder that checks out (sizes and
        checksums). None when there is none at all; CheckpointError when checkpoints exist but none is valid."""
        say = (lambda m: print(m, flush=True)) if verbose and _rank() == 0 else (lambda m: None)
        candidates = self.complete_checkpoints()
        named = self._pointed(candidates, say)
        if named is not None:
            candidates.remove(named)
            candidates.append(named)
        errors = []
        for folder in reversed(candidates):
            try:
                check_complete(folder)
                return folder
            except CheckpointError as e:
                errors.append(str(e))
                say(f"resume: skipping {e}")
        if errors:
            raise CheckpointError(f"train.resume=auto: none of the {len(errors)} checkpoints in {self.root} is valid "
                                  f"(newest: {errors[0]}); nothing was changed")
        return None

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Collective over the default group: every rank passes the tensors it holds. A failure on any rank (a full
        disk) raises CheckpointSaveError on every rank, with the previous checkpoint untouched."""
        final, tmp = self.folder(step), self.root / f"step_{step:08d}.tmp"
        error = None
        try:
            if _rank() == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
            _barrier()
            dcp.save(tensors, checkpoint_id=str(tmp))
            _barrier()
            faults.in_save(step, _rank(), self.root.parent)   # tests: a crash with the shards written, meta not
        except (OSError, CheckpointException) as e:   # DCP wraps a rank's write error in CheckpointException
            error = e
        failed = _agree(error)
        if failed is None and _rank() == 0:
            try:
                self._complete(step, tmp, final, meta)
            except OSError as e:
                error = e
        failed = _agree(error)
        if failed is not None:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            try:
                previous = self.latest(verbose=False)
            except CheckpointError:
                previous = None
            kept = f"; {previous} is intact" if previous else ""
            raise CheckpointSaveError(f"step {step}: saving the checkpoint to {tmp} failed: {failed}{kept}")
        return final

    def _complete(self, step: int, tmp: Path, final: Path, meta: dict) -> None:
        meta = {**meta, "format_version": FORMAT_VERSION, "step": step, "files": _file_table(tmp)}
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
        if final.exists():  # the same step saved again after a restart: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(self.root / "latest", final.name + "\n")
        for old in self.complete_checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def verify(folder: str | Path) -> dict:
        """meta.json of a complete checkpoint folder, or CheckpointError naming the file that is wrong. Reads every
        file once (sha256); call it before anything else reads the folder."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"train.resume={str(folder)!r}: no such checkpoint folder")
        return check_complete(folder)

    @staticmethod
    def load(folder: str | Path, tensors: dict[str, torch.Tensor], verified: dict | None = None) -> dict:
        """Load in place into `tensors` (the keys this rank holds). Mismatched shapes or missing keys are named.
        `verified`: meta.json as returned by verify() when the caller (rank 0) has just checked the folder."""
        folder = Path(folder)
        meta = verified if verified is not None else Checkpointer.verify(folder)
        md = read_metadata(folder)
        saved = md.state_dict_metadata
        missing = [k for k in tensors if k not in saved]
        wrong = [f"{k} {tuple(saved[k].size)} vs model {tuple(t.shape)}" for k, t in tensors.items()
                 if k in saved and hasattr(saved[k], "size") and tuple(saved[k].size) != tuple(t.shape)]
        if wrong:
            more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
            raise CheckpointError(f"checkpoint {folder} was written for another model shape: {'; '.join(wrong[:3])}{more}")
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(f"checkpoint {folder} lacks tensors {', '.join(missing[:3])}{more}")
        load_tensors(folder, tensors, md)
        return meta


class CheckpointSaveError(CheckpointError):
    """A save failed (disk full, quota, I/O error): one line, the previous checkpoint intact."""


def _agree(error: BaseException | None) -> str | None:
    """The first failing rank's error (in rank order) in one line, the same on every rank; None if none failed.
    Collective."""
    mine = None if error is None else (str(error) if isinstance(error, OSError) else _cause(error))
    if not dist.is_initialized():
        return mine
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, mine)
    return next((e for e in errors if e is not None), None)

"""Atomic, resumable checkpoints on torch.distributed.checkpoint (DCP).

A checkpoint is a folder `step_00000100/` holding DCP's shards and `.metadata` plus our `meta.json` (step, sampler
and LR-schedule state, the resolved config, the size of every file). It is written as `step_00000100.tmp/` by all
ranks, then renamed by rank 0 once complete; `latest` (a one-line file replaced atomically) is updated last and the
oldest folders beyond `keep` are pruned after that. So a crash at any point leaves the previous checkpoint intact
and selected. A folder whose files do not match the sizes in its meta.json (truncated, partly deleted) is reported
as corrupt; `resume=auto` then falls back to the previous complete one.
Tensors are keyed by the model's fully-qualified names: a tensor held by several ranks (data-parallel replicas)
is written once, and a pipeline rank loads only the keys of the stages it holds, so the layout can change on resume.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from framework import faults

FORMAT_VERSION = 1


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


def _file_table(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != "meta.json"}


def check_complete(folder: Path) -> dict:
    """meta.json of a complete, untruncated checkpoint, or CheckpointError saying what is wrong."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {folder}: no meta.json (incomplete or not a duet checkpoint)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {folder}: meta.json is corrupt ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {folder}: format_version={meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    want, have = meta.get("files", {}), _file_table(folder)
    for name, size in want.items():
        if name not in have:
            raise CheckpointError(f"checkpoint {folder}: file {name} is missing")
        if have[name] != size:
            raise CheckpointError(f"checkpoint {folder}: file {name} has {have[name]} bytes, expected {size} (truncated?)")
    digest = hashlib.sha256((folder / ".metadata").read_bytes()).hexdigest()
    if digest != meta.get("metadata_sha256"):
        raise CheckpointError(f"checkpoint {folder}: .metadata does not match its checksum (corrupt)")
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

    def latest(self, verbose: bool = True) -> Optional[Path]:
        """Newest complete checkpoint: the `latest` pointer if valid, else the newest folder that checks out."""
        candidates = self.complete_checkpoints()
        pointer = self.root / "latest"
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.append(named)
        for folder in reversed(candidates):
            try:
                check_complete(folder)
                return folder
            except CheckpointError as e:
                if verbose and _rank() == 0:
                    print(f"resume: skipping {e}", flush=True)
        return None

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Collective over the default group: every rank passes the tensors it holds."""
        final, tmp = self.folder(step), self.root / f"step_{step:08d}.tmp"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
        _barrier()
        try:
            dcp.save(tensors, checkpoint_id=str(tmp))
            _barrier()
            faults.in_save(step, _rank(), self.root.parent)   # tests: a crash with the shards written, meta not
            if _rank() == 0:
                meta = {**meta, "format_version": FORMAT_VERSION, "step": step, "files": _file_table(tmp),
                        "metadata_sha256": hashlib.sha256((tmp / ".metadata").read_bytes()).hexdigest()}
                _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
                if final.exists():  # the same step saved again after a restart: replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _write_atomic(self.root / "latest", final.name + "\n")
                for old in self.complete_checkpoints()[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _barrier()
        return final

    @staticmethod
    def verify(folder: str | Path) -> dict:
        """meta.json of a complete checkpoint folder, or CheckpointError naming what is wrong. Cheap: sizes and the
        checksum of .metadata; call it before anything else reads the folder."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"train.resume={str(folder)!r}: no such checkpoint folder")
        return check_complete(folder)

    @staticmethod
    def load(folder: str | Path, tensors: dict[str, torch.Tensor]) -> dict:
        """Load in place into `tensors` (the keys this rank holds). Mismatched shapes or missing keys are named."""
        folder = Path(folder)
        meta = Checkpointer.verify(folder)
        saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        missing = [k for k in tensors if k not in saved]
        wrong = [f"{k} {tuple(saved[k].size)} vs model {tuple(t.shape)}" for k, t in tensors.items()
                 if k in saved and hasattr(saved[k], "size") and tuple(saved[k].size) != tuple(t.shape)]
        if wrong:
            more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
            raise CheckpointError(f"checkpoint {folder} was written for another model shape: {'; '.join(wrong[:3])}{more}")
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(f"checkpoint {folder} lacks tensors {', '.join(missing[:3])}{more}")
        dcp.load(tensors, checkpoint_id=str(folder))
        return meta

"""What a run resumes from, decided once for all ranks, and what it keeps or changes from the checkpoint.

Rank 0 takes the run folder's lock, picks the checkpoint (train.resume: auto | none | <folder>), verifies every
file's sha256, and broadcasts the choice (or the one-line error) to every rank, so all ranks load the same step even
when the folder changes under them. Then, against the checkpoint's meta.json:
  - data: the prepared data's identity (its meta.json and tokenizer) must match, unless
    train.resume_allow_data_change=true: a run that silently continues on another corpus or tokenizer is wrong;
  - learning rate: the configured optim.lr and schedule settings apply from the resumed step on (the scheduler's
    state only carries the step count); a change is said in one line.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from framework.checkpoint import CheckpointError, Checkpointer
from framework.runlock import RunLock

log = logging.getLogger("duet")


@dataclass
class Decision:
    folder: Optional[Path]          # None: start from step 0
    meta: Optional[dict]            # the folder's verified meta.json


def _decide(cfg, ckpt: Checkpointer) -> Decision:
    r = cfg.train.resume
    if r == "none":
        return Decision(None, None)
    folder = ckpt.latest() if r == "auto" else Path(r)
    if folder is None:
        return Decision(None, None)
    return Decision(folder, Checkpointer.verify(folder))


def decide(cfg, ckpt: Checkpointer, rank: int, distributed: bool, lock: RunLock | None) -> Decision:
    """Rank 0 locks the folder and chooses; every rank gets the same Decision or raises the same one-line error."""
    out: list = [None]
    if rank == 0:
        try:
            if lock is not None:
                lock.acquire()
            out[0] = _decide(cfg, ckpt)
        except Exception as e:          # every rank raises it, none waits for a broadcast that never comes
            out[0] = e
            if lock is not None:
                lock.release()          # a refused run leaves the folder as it found it
    if distributed:
        dist.broadcast_object_list(out, src=0)
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def data_identity(prepared_folder: Path) -> str:
    """sha256 of what defines the token stream: the prepared data's meta.json (less its source path, which may move)
    and tokenizer.json when there is one."""
    h = hashlib.sha256()
    meta = json.loads((Path(prepared_folder) / "meta.json").read_text())
    meta.pop("source", None)
    h.update(json.dumps(meta, sort_keys=True).encode())
    tok = Path(prepared_folder) / "tokenizer.json"
    if tok.is_file():
        h.update(tok.read_bytes())
    return h.hexdigest()


def check_data(meta: dict, identity: str, allow_change: bool, folder: Path) -> None:
    saved = meta.get("data_identity")
    if saved is None or saved == identity:
        return
    if not allow_change:
        raise CheckpointError(f"checkpoint {folder} was trained on other data or another tokenizer (data identity "
                              f"{saved[:12]} vs {identity[:12]} now); set train.resume_allow_data_change=true to "
                              f"continue on the new data")
    log.warning(f"resume: the data differs from the checkpoint's ({saved[:12]} vs {identity[:12]}); continuing on it "
                f"(train.resume_allow_data_change=true)")


def apply_schedule(scheduler, optimizer, lr: float, step: int) -> None:
    """After scheduler.load_state_dict: the configured peak lr and schedule (the lambdas, built from this run's
    config) take over at the resumed step. Unchanged settings give the checkpoint's lr bit for bit."""
    saved_base, saved_last = list(scheduler.base_lrs), list(scheduler.get_last_lr())
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    last = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler._last_lr = last
    for g, v in zip(optimizer.param_groups, last):
        g["initial_lr"], g["lr"] = lr, v
    if saved_base and saved_base[0] != lr:
        log.warning(f"resume: optim.lr={lr:g} applies from step {step} on (the checkpoint ran with {saved_base[0]:g}); "
                    f"lr is now {last[0]:.6g}, was {saved_last[0]:.6g}")
    elif saved_last and saved_last[0] != last[0]:
        log.warning(f"resume: the LR schedule settings changed; lr at step {step} is now {last[0]:.6g}, was "
                    f"{saved_last[0]:.6g}")

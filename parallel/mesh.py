"""Process mesh from torchrun's environment: pipeline x data-parallel ranks (experts are sharded over data-parallel
ranks, as DeepSeek-V3 trains: PP x EP/DP, no tensor parallelism, V3 §3.2).

Rank r sits at pipeline rank r // dp and data-parallel rank r % dp, so the ranks of one pipeline are dp apart and a
data-parallel group is contiguous (on a GPU cluster: one node holds whole data-parallel/expert groups, whose
all-to-all is the heaviest traffic). Every process group of a run is created here; the rest of the code asks the
mesh for groups and ranks (`pipeline_ranks`, `mirror_groups`) instead of re-deriving the formula.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from parallel.nccl import nccl_options, sm_budget_note

log = logging.getLogger(__name__)
_said_not_applicable = False   # the SM-budget line is said once per process


@dataclass
class Mesh:
    rank: int
    world_size: int
    pp: int
    dp: int
    ep: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    pp_group: Optional[dist.ProcessGroup] = None   # None when single-process
    dp_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None   # ranks that exchange tokens for the experts (a slice of dp)
    edp_group: Optional[dist.ProcessGroup] = None  # ranks that hold the same experts (replicas across ep slices)
    # (key, pipeline rank a, pipeline rank b) -> this pipeline's group of a and b (None: this rank is neither)
    _pair_groups: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    def pipeline_ranks(self, dp_rank: Optional[int] = None) -> list[int]:
        """Global ranks of one pipeline (default: this rank's), indexed by pipeline rank."""
        d = self.dp_rank if dp_rank is None else dp_rank
        return [p * self.dp + d for p in range(self.pp)]

    def pipelines(self) -> list[list[int]]:
        """Global ranks of every pipeline, one list per data-parallel rank."""
        return [self.pipeline_ranks(d) for d in range(self.dp)]

    def mirror_groups(self, pairs: Mapping[int, tuple[int, int]]) -> dict:
        """key -> the two-rank group of this rank's pipeline for `pairs[key]` = (pipeline rank a, pipeline rank b),
        for the keys whose pair holds this rank. DualPipe keys them by model part: each part its own group, so the
        exchanges of two parts held by the same pair never queue behind each other.

        Collective the first time a pair is asked for (every rank asks for the same `pairs`); init_mesh creates them
        up front when given the layout's pairs, and later calls return the same groups.
        """
        if not self.distributed:
            return {}
        wanted = {(key, *pair): (key, tuple(pair)) for key, pair in pairs.items()}
        new = {k: pair for k, (_, pair) in wanted.items() if k not in self._pair_groups}
        made = pair_groups(self.pipelines(), new)
        self._pair_groups.update({k: made.get(k) for k in new})     # None: this rank is not in the pair
        return {key: self._pair_groups[k] for k, (key, _) in wanted.items() if self._pair_groups[k] is not None}


def env_world() -> tuple[int, int, int]:
    """rank, world size, local rank from torchrun's environment (1 process when absent)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def restart_safe_store(rank: int, world: int, timeout: timedelta):
    """torchrun lets its workers rendezvous on the agent's own TCP store, which outlives a group that --max-restarts
    restarts: the previous attempt's keys (gloo's peer addresses, heartbeats) are still there and the new group
    connects to dead peers ("Gloo connectFullMesh failed"). On one node (one agent, one restart count) a key prefix
    per restart keeps the attempts apart, so `torchrun --standalone --max-restarts=N` works as typed. Across nodes
    the agents' restart counts differ: there torchrun needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the recipes in
    launch/ export it). None: initialise from the environment as usual."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("LOCAL_WORLD_SIZE", str(world)) != str(world):
        if restart != "0":
            raise ValueError("a multi-node group restarted by torchrun cannot reuse the agent's store: start torchrun "
                             "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 exported (see launch/multinode.sh)")
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                           timeout=timeout)
    return dist.PrefixStore(f"duet/restart{restart}/", client)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda': no CUDA device is visible; use train.device=cpu or auto")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pair_groups(pipelines: Sequence[Sequence[int]], pairs: Mapping[int, tuple[int, int]]) -> dict:
    """key -> the two-rank group of pipeline ranks `pairs[key]` = (a, b) in this process's pipeline, for the keys
    whose pair holds this process (`pipelines`: the global ranks of each pipeline, indexed by pipeline rank).
    Collective: every process creates every pipeline's group for every key, in the same order."""
    me, out = dist.get_rank(), {}
    for key, (a, b) in sorted(pairs.items()):
        for ranks in pipelines:
            members = [ranks[a], ranks[b]]
            group = dist.new_group(members)
            if me in members:
                out[key] = group
    return out


def init_mesh(pp: int, dp: Optional[int], ep: int, device: str = "auto", backend: str = "auto",
              timeout_s: float = 300.0, sm_budget: int = 20,
              mirror_pairs: Optional[Mapping[int, tuple[int, int]]] = None) -> Mesh:
    """The mesh and its groups: data-parallel, pipeline, expert-parallel (with the SM budget on NCCL), expert
    replicas, and the pairs of pipeline ranks whose gradients are summed (`mirror_pairs`: DualPipe's duplicated
    parts, part -> (pipeline rank, pipeline rank); see Mesh.mirror_groups)."""
    rank, world, local_rank = env_world()
    dp = dp if dp is not None else world // pp
    if pp * dp != world:
        raise ValueError(f"parallel.pp * parallel.dp = {pp} * {dp} must equal the world size {world}")
    if dp % ep:
        raise ValueError(f"parallel.ep={ep}: must divide parallel.dp={dp}")
    dev = pick_device(device, local_rank)
    mesh = Mesh(rank, world, pp, dp, ep, rank // dp, rank % dp, dev)
    if world == 1:
        return mesh
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise ValueError("parallel.backend='nccl': this torch build has no NCCL; use gloo or auto")
    if not dist.is_initialized():
        store = restart_safe_store(rank, world, timedelta(seconds=timeout_s))
        kw = dict(store=store, rank=rank, world_size=world) if store is not None else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None, **kw)
    # every rank must create every group, in the same order
    for p in range(pp):
        g = dist.new_group([p * dp + d for d in range(dp)])
        if p == mesh.pp_rank:
            mesh.dp_group = g
    for d, ranks in enumerate(mesh.pipelines()):
        g = dist.new_group(ranks)
        if d == mesh.dp_rank:
            mesh.pp_group = g
    for p in range(pp):
        for s in range(dp // ep):
            # the all-to-all group: on NCCL its communicator is limited to sm_budget SMs (V3 §3.2.2)
            g = new_ep_group([p * dp + s * ep + e for e in range(ep)], backend, sm_budget) if ep > 1 else \
                dist.new_group([p * dp + s * ep + e for e in range(ep)])
            if p == mesh.pp_rank and s == mesh.dp_rank // ep:
                mesh.ep_group = g
        for e in range(ep):
            g = dist.new_group([p * dp + s * ep + e for s in range(dp // ep)])
            if p == mesh.pp_rank and e == mesh.ep_rank:
                mesh.edp_group = g
    mesh.mirror_groups(mirror_pairs or {})
    return mesh

def new_ep_group(ranks: Sequence[int], backend: Optional[str] = None, sm_budget: int = 20):
    """dist.new_group for an expert-parallel group; on NCCL it gets the SM budget of `nccl_options`.

    The decision follows the backend actually used by the group (not whether this torch build has NCCL): gloo on a
    CUDA build logs the not-applicable line once, like a CPU build. Every rank of the world must call it with the same
    arguments, in the same order.
    """
    global _said_not_applicable
    backend = backend or dist.get_backend()
    note = sm_budget_note(backend, sm_budget)
    if note is not None and not _said_not_applicable:
        log.info(note)
        _said_not_applicable = True
    opts = nccl_options(sm_budget) if note is None else None
    return dist.new_group(list(ranks), backend=backend, pg_options=opts)


def free_port() -> int:
    """A free TCP port on this machine, for a local rendezvous (tests, benchmarks, single-node spawns)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

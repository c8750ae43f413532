"""The API of deepseek-ai/DualPipe, on this package's schedules and executor.

Code written for that library runs after changing its imports only:

    from schedules.compat import DualPipe, DualPipeV, set_p2p_tensor_shapes, set_p2p_tensor_dtype
    from schedules.compat import WeightGradStore, run_backward

and it runs on CPU/gloo as well as CUDA/NCCL (the device is the modules' own). The semantics are the library's:

DualPipe (V3 §3.2.1), PP even, num_chunks even and >= 2*PP. Rank r holds `modules = (part r, part PP-1-r)`.
  Rank 0 gets the inputs of the first half of the chunks and the labels of the second half; the last rank the
  inputs of the second half and the labels of the first half. `step` returns, on rank 0, the per-chunk losses
  (stacked) of the second half and their outputs; on the last rank those of the first half; None elsewhere.
DualPipeV, any PP >= 1, num_chunks >= 2*PP. Rank r holds `modules = (part r, part 2*PP-1-r)` of a 2*PP-part
  model; rank 0 gets all inputs and labels and returns all losses and outputs.
Each chunk's loss is back-propagated with gradient 1 (scale inside the criterion to average), and each local
copy keeps its own gradient: with DualPipe the caller sums the two copies of a part (schedules/mirror.py's
MirrorExchange does it under the step).
Training or inference is chosen by torch.is_grad_enabled(), as in the library.

One addition, `weight_grad_split=True` (keyword only, after the library's arguments): at construction every plain
nn.Linear and nn.Embedding inside both modules becomes its deferring subclass in place (SplitLinear, SplitEmbedding,
by schedules.weight_grad.enable_weight_grad_split), so its weight gradient waits for the schedule's W action instead
of running inside B, as the bubble formulas of V3 Table 2 assume (the -3W of DualPipe and DualPipeV, V3 §3.2.1) and
as torch's ScheduleDualPipeV does for any module. In the library only layers that hand their closure to
WeightGradStore defer: `weight_grad_split=False` keeps that timing. Layers that declare their own split (subclasses,
e.g. a user's WeightGradStore linear or an FP8 linear) are left alone.
  Changes: timing (DualPipeV at PP=2 with 8 chunks: 7.7% bubble without, 4.0% with, by schedules.simulate) and
  memory: a deferred layer keeps its input and output gradient from B until W, about 2.5 MiB per block and chunk on
  bench/dropin.py's workload (blocks of 256/1024, chunks of [4, 64, 256]): at most 9.75 MiB (DualPipe) and 4.75 /
  10 MiB (DualPipeV, ranks 0 / 1) wait for a W, after the step's peak, which stays 46.0 and 33.8 / 34.5 MiB.
  Does not change: losses and gradients, bit for bit those of weight_grad_split=False (the same kernels, W adds a
  part's chunks in the order its B ran, and a weight used twice in one chunk gets its contributions summed before
  they are accumulated, as autograd does: framework.weight_grad.run_weight_grads), checked on CPU; GPU not measured
  (cuBLAS may pick another algorithm for W's GEMM). Exception: a weight shared between a plain linear and a user's
  WeightGradStore layer, whose contributions then meet in W in another order. Under torch.autocast a swapped linear
  runs as nn.Linear (undeferred), since autocast does not cast a custom Function's operands.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from .executor import PipelineExecutor
from .registry import build, get_layout
from .weight_grad import WeightGradStore, enable_weight_grad_split, run_backward

__all__ = ["DualPipe", "DualPipeV", "set_p2p_tensor_shapes", "set_p2p_tensor_dtype", "WeightGradStore",
           "run_backward"]

# What every pipeline boundary carries, per chunk (process-wide, as in the library).
TENSOR_SHAPES: Optional[List[Tuple[int, ...]]] = None
TENSOR_DTYPE: Optional[torch.dtype] = None


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """Shapes of the tensors one stage sends the next for one chunk (their gradients come back alike)."""
    global TENSOR_SHAPES
    if not isinstance(shapes, (list, tuple)) or not all(isinstance(s, (list, tuple, torch.Size)) for s in shapes):
        raise ValueError(f"shapes={shapes!r}: must be a list of shapes, e.g. [(micro_batch, seq, hidden)]")
    TENSOR_SHAPES = [tuple(int(d) for d in s) for s in shapes]


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    global TENSOR_DTYPE
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r}: must be a torch.dtype")
    TENSOR_DTYPE = dtype


def _scatter(tensors: Sequence[Optional[torch.Tensor]], chunks: int, dim: int) -> list[tuple]:
    """Split each tensor into `chunks` pieces along `dim`: one tuple of pieces per chunk."""
    pieces = [t.tensor_split(chunks, dim=dim) for t in tensors]
    return [tuple(p[i] for p in pieces) for i in range(chunks)]


def _gather(per_chunk: list[tuple], dim: int):
    """Concatenate chunk outputs back along `dim`; a single output comes back as a tensor, several as a tuple."""
    out = tuple(torch.cat(parts, dim=dim) for parts in zip(*per_chunk))
    return out[0] if len(out) == 1 else out


class _BidirectionalPipe(nn.Module):
    schedule = ""

    def __init__(self, modules: Tuple[nn.Module, nn.Module], batch_dim: int = 0,
                 process_group: Optional[dist.ProcessGroup] = None, rank_mapping: Optional[List[int]] = None, *,
                 weight_grad_split: bool = True):
        super().__init__()
        if len(modules) != 2:
            raise ValueError(f"modules: {type(self).__name__} takes exactly 2 modules per rank, got {len(modules)}")
        if not isinstance(weight_grad_split, bool):
            raise ValueError(f"weight_grad_split={weight_grad_split!r}: must be True (plain nn.Linear / nn.Embedding "
                             f"defer their weight gradient to W) or False (the reference library's timing)")
        self.module = nn.ModuleList(modules)
        self.overlapped_forward_backward = (type(modules[0]) is type(modules[1])
                                            and hasattr(type(modules[0]), "overlapped_forward_backward"))
        self.batch_dim = batch_dim
        self.group = process_group
        self.num_ranks = dist.get_world_size(process_group)
        self._check_num_ranks()
        if rank_mapping is None:
            rank_mapping = list(range(self.num_ranks))
        self.rank = rank_mapping[dist.get_rank(process_group)]
        self.is_first_rank = self.rank == 0
        self.is_last_rank = self.rank == self.num_ranks - 1
        self.layout = get_layout(self.schedule, self.num_ranks)
        held = self.layout.stages_of(self.rank)  # (the part run first by data, the part of the way back)
        self._executor = PipelineExecutor(self.layout, {held[0]: modules[0], held[1]: modules[1]},
                                          group=process_group, rank_mapping=rank_mapping)
        self._actions: dict[int, list] = {}
        # last, once every argument has been accepted: a refused pipe leaves the caller's modules as they were
        self.weight_grad_split = weight_grad_split
        self.split_layers = sum(enable_weight_grad_split(m) for m in modules) if weight_grad_split else 0

    # ---- what differs between DualPipe and DualPipeV
    def _check_num_ranks(self) -> None:
        pass

    def _check_num_chunks(self, num_chunks) -> None:
        raise NotImplementedError

    def _chunk_ids(self, num_chunks: int) -> tuple[list[int], list[int]]:
        """(chunks whose inputs this rank is given, chunks whose labels it is given), in batch order."""
        raise NotImplementedError

    # ---- the step
    def step(self, *inputs: Optional[torch.Tensor], num_chunks: int = 0, criterion: Optional[Callable] = None,
             labels: Sequence[Optional[torch.Tensor]] = (), return_outputs: bool = False
             ) -> Tuple[Optional[torch.Tensor], Optional[Union[torch.Tensor, Tuple[torch.Tensor, ...]]]]:
        """One training step (or inference under torch.no_grad()). Returns (loss, outputs), see the module doc."""
        if TENSOR_SHAPES is None or TENSOR_DTYPE is None:
            raise RuntimeError("call set_p2p_tensor_shapes and set_p2p_tensor_dtype before step()")
        self._check_num_chunks(num_chunks)
        train = torch.is_grad_enabled()
        input_ids, label_ids = self._chunk_ids(num_chunks)
        if train and label_ids and criterion is None:
            raise ValueError(f"criterion=None: pipeline rank {self.rank} computes losses, a criterion is required "
                             f"for training")
        if isinstance(labels, torch.Tensor):
            labels = (labels,)
        feeds = {}
        for what, given, ids in (("inputs", inputs, input_ids), ("labels", tuple(labels), label_ids)):
            if not ids or (what == "labels" and criterion is None):
                continue
            if not given or any(t is None for t in given):
                raise ValueError(f"{what}={given!r}: pipeline rank {self.rank} needs tensors for chunks "
                                 f"{ids[0]}..{ids[-1]}")
            feeds[what] = dict(zip(ids, _scatter(given, len(ids), self.batch_dim)))

        ex = self._executor
        params = [p for p in self.parameters()]
        if params:
            ex.device = params[0].device
        ex.criterion, ex.p2p_shapes, ex.p2p_dtype = criterion, TENSOR_SHAPES, TENSOR_DTYPE
        if num_chunks not in self._actions:
            self._actions[num_chunks] = build(self.schedule, self.num_ranks, num_chunks)[self.rank]
        res = ex.run(self._actions[num_chunks], num_chunks, feeds.get("inputs", {}), feeds.get("labels", {}),
                     train=train, return_outputs=return_outputs)

        loss = outputs = None
        if label_ids:
            if criterion is not None:
                loss = torch.stack([res.losses[c] for c in label_ids])
            if return_outputs:
                outputs = _gather([res.outputs[c] for c in label_ids], self.batch_dim)
        return loss, outputs


class DualPipe(_BidirectionalPipe):
    """Bidirectional pipeline over an even number of ranks; rank r holds (part r, part PP-1-r)."""
    schedule = "dualpipe"

    def _check_num_ranks(self) -> None:
        if self.num_ranks % 2:
            raise ValueError(f"process_group of size {self.num_ranks}: DualPipe needs an even number of ranks "
                             f"(mirror pairs); use DualPipeV for an odd count")

    def _check_num_chunks(self, num_chunks) -> None:
        if not isinstance(num_chunks, int) or num_chunks <= 0 or num_chunks % 2 or num_chunks < 2 * self.num_ranks:
            raise ValueError(f"num_chunks={num_chunks!r}: DualPipe on {self.num_ranks} ranks needs an even number "
                             f">= 2 * ranks = {2 * self.num_ranks}")

    def _chunk_ids(self, num_chunks: int) -> tuple[list[int], list[int]]:
        half = num_chunks // 2
        first, second = list(range(half)), list(range(half, num_chunks))
        if self.is_first_rank:    # direction 0 enters here; direction 1 ends here
            return first, second
        if self.is_last_rank:
            return second, first
        return [], []


class DualPipeV(_BidirectionalPipe):
    """V-shaped pipeline over any number of ranks; rank r holds (part r, part 2*PP-1-r) of a 2*PP-part model."""
    schedule = "dualpipev"

    def _check_num_chunks(self, num_chunks) -> None:
        if not isinstance(num_chunks, int) or num_chunks <= 0 or num_chunks < 2 * self.num_ranks:
            raise ValueError(f"num_chunks={num_chunks!r}: DualPipeV on {self.num_ranks} ranks needs "
                             f">= 2 * ranks = {2 * self.num_ranks}")

    def _chunk_ids(self, num_chunks: int) -> tuple[list[int], list[int]]:
        ids = list(range(num_chunks)) if self.is_first_rank else []
        return ids, ids

"""The SM budget of NCCL communicators (V3 §3.2.2), and the line that says where it does not apply.

There is no communication stream of our own: an asynchronous NCCL collective already runs on the communicator's
internal stream, made high-priority and limited to `sm_budget` CTAs by the options below, and its Work.wait() orders
the compute stream after it. A stream of ours in front of it would only add an event hop.

DeepSeek-V3 gives 20 of the H800's 132 SMs to all communication and the rest to compute (V3 §3.2.2). NCCL takes that
limit as CTAs per communicator (`max_ctas`/`min_ctas`), set when the process group is created (parallel/mesh.py builds
the expert-parallel groups with it). On CPU (gloo) nothing of the sort exists, and we say so once instead of
pretending.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist


def _check_sm_budget(sm_budget) -> None:
    if not isinstance(sm_budget, int) or isinstance(sm_budget, bool) or sm_budget < 1:
        raise ValueError(f"parallel.comm.sm_budget={sm_budget!r}: must be a positive int "
                         f"(SMs / CTAs for communication)")


def nccl_options(sm_budget: int):
    """ProcessGroupNCCL.Options that cap NCCL at `sm_budget` CTAs on a high-priority stream (None without NCCL).

    max_ctas = min_ctas = sm_budget pins the communicator's footprint (V3 §3.2.2: 20 SMs), so the remaining SMs are
    guaranteed to compute. Not yet measured on a GPU: whether NCCL honours the limit is what bench/gpu_nccl.py checks.
    """
    _check_sm_budget(sm_budget)
    if not dist.is_nccl_available():
        return None
    opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    opts.config.max_ctas = sm_budget
    opts.config.min_ctas = sm_budget
    return opts


def sm_budget_note(backend: str, sm_budget: int) -> Optional[str]:
    """None where the SM budget applies (NCCL), else the one line that says why it does not."""
    _check_sm_budget(sm_budget)
    if backend == "nccl":
        return None
    return f"parallel.comm.sm_budget={sm_budget}: not applicable ({backend}): only NCCL communicators take CTA limits"

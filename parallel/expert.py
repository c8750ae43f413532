"""Expert parallelism: MoE token dispatch/combine over an all-to-all, blocking and asynchronous.

The routed experts of every MoE layer are split over the `ep` ranks of an expert-parallel group in contiguous
blocks: ep rank r holds experts [r*E/ep, (r+1)*E/ep). One MoE layer on one rank then runs

    route          x [N, C] -> topk_idx [N, K], topk_weight [N, K]
    permute        the N*K (token, choice) rows sorted by expert = by destination rank, then expert   [M_send, C]
    counts         all_to_all of the [ep, E_local] token counts (tiny; "counts" layout)  -- a host sync, see below
    dispatch       all_to_all of the rows (optionally FP8, V3 §3.3)                                   [M_recv, C]
    regroup        received rows are in [source rank][local expert] order; experts want [local expert][source rank]
    experts        grouped GEMM over this rank's experts
    combine        the same way back: un-regroup, reverse all_to_all (high precision), weighted sum on the SOURCE rank

The routing weights never travel: each source rank multiplies the returned expert outputs by its own weights, so the
gate's gradient stays local and the payload back is just the expert outputs.

Two layouts of the dispatch message (`layout`, parallel.comm.dispatch):

- "counts" (default): the receive buffer's size and the split sizes of all_to_all_single must be known on the host,
  and only the peers know how many rows they will send. So a dispatch exchanges the [ep, E_local] count matrix and
  reads it (`.tolist()`) before it can start the row exchange: on a GPU this waits for the router's kernels and the
  count exchange. `start_counts` + `.start_rows()` split the two so that the caller can compute (the other chunk of
  an F&B pair, schedules/overlap.py) while the counts travel; `start_dispatch` does both at once. DeepEP's normal
  kernels make the same CPU wait.
- "padded": every rank sends each of its tokens ONCE to every ep rank, in a message of fixed size (`capacity` token
  slots, default: this call's N, which must then be the same on every rank of the group, as a training micro-batch
  is; unequal sizes make the exchange fail), each token carrying its K expert choices; the receiver keeps the
  (token, choice) pairs of its own experts (in effect an all-gather, kept an all_to_all for the link model). No
  count exchange, so no wait on the peers before the tokens leave, and one exchange fewer on the critical path of
  a MoE block; the price is (ep-1)*capacity rows sent per rank instead of the routed rows (about the same at ep=2,
  top-2; ep/K times more at large ep: DeepEP's low-latency mode makes the same trade for small batches). Nothing is
  dropped, and the combine and both backward exchanges move exactly the routed rows (both sides know the splits once
  the dispatch has arrived), so the two layouts give bit-identical results.

Backward: the gradient of a dispatch is a combine-direction exchange of the row gradients and vice versa
(`start_dispatch_backward`, `start_combine_backward`, recorded as "<name>.backward"). Autograd runs them blocking
(`_Arrived`); a MoE block cut into steps starts them itself (framework/models/deepseek_v3/moe.py). An FP8 dispatch
sends its gradients back in the gradient's own precision (straight-through: the quantization is treated as the
identity). A backward exchange exists only when its input needs a gradient, so every rank of the group must agree on
that (the same model on every rank does: the layer's input requires grad everywhere or nowhere).

Placing the experts (which module keeps which slice) is the model's business: framework/models/expert_parallel.py
asks every MoE layer to keep `local_expert_range` and hands it an ExpertParallelDispatcher.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from framework.fp8.quantize import dequantize_act, quantize_act   # FP8 dispatch payloads
from parallel import exchanges
from parallel.dispatch import Dispatcher, weighted_sum


# --------------------------------------------------------------------------------------------------------------------
# Differentiable, startable all-to-all of rows
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class _Route:
    """How rows travel: this rank sends in_splits[j] rows to rank j and receives out_splits[j] rows from rank j."""
    out_splits: list[int]
    in_splits: list[int]
    group: object
    name: str
    link: Optional[exchanges.EmulatedLink]
    recorder: Optional[exchanges.CommRecorder]
    fp8: bool = False
    pow2: bool = True


def _fp8_rows(x: torch.Tensor, pow2: bool) -> torch.Tensor:
    """FP8 payload rows (V3 §3.3): 1x128 tiles, one uint8 row = C e4m3 bytes + G fp32 scales. [M, C] -> [M, C + 4G]"""
    C, G = x.shape[1], math.ceil(x.shape[1] / 128)
    if x.shape[0] == 0:  # nothing to quantize (and an empty scale tensor cannot be viewed as bytes)
        return torch.empty(0, C + 4 * G, dtype=torch.uint8, device=x.device)
    q, scale = quantize_act(x.detach(), pow2=pow2)                            # [M, C] e4m3, [M, G] fp32
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=1)


def _from_fp8_rows(rows: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of _fp8_rows, dequantized to dtype: [M, C + 4G] -> [M, C]."""
    rq = rows[:, :C].contiguous().view(torch.float8_e4m3fn)
    rs = rows[:, C:].contiguous().view(torch.float32)
    return dequantize_act(rq, rs, dtype=dtype)


def _start(x: torch.Tensor, route: _Route, out: torch.Tensor) -> exchanges.Exchange:
    """Start moving the rows of x [sum(in_splits), C] along `route` into out [sum(out_splits), C]."""
    if not route.fp8:
        return exchanges.all_to_all(out, x.contiguous(), route.out_splits, route.in_splits, route.group, route.name,
                               route.link, route.recorder)
    C = x.shape[1]
    payload = _fp8_rows(x, route.pow2)                                         # [M, C + 4G]
    received = payload.new_empty(sum(route.out_splits), payload.shape[1])

    def unpack():
        with torch.no_grad():
            out.detach().copy_(_from_fp8_rows(received, C, out.dtype))
        return out

    return exchanges.all_to_all(received, payload, route.out_splits, route.in_splits, route.group, route.name,
                           route.link, route.recorder, finish=unpack)


class _Arrived(torch.autograd.Function):
    """Rows that arrived by an exchange (computed without autograd, handed in through `holder`) as a function of
    the rows `x` that left: the backward hands the gradient to `back`, which sends it home (a blocking exchange in
    the reverse direction, in the gradient's own precision). The stepped forward of a MoE block starts the same
    backward exchanges itself (start_dispatch_backward, start_combine_backward), so both paths share them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, holder: list, back):
        ctx.back = back
        return holder.pop()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.back(grad), None, None


def _arrived(x: torch.Tensor, rows: torch.Tensor, back) -> torch.Tensor:
    return _Arrived.apply(x, [rows], back)


LAYOUTS = ("counts", "padded")


class CountsInFlight:
    """A dispatch whose token counts are travelling; start_rows() waits for them and starts the row exchange."""

    def __init__(self, start_rows):
        self._start_rows = start_rows

    def start_rows(self) -> "Pending":
        start, self._start_rows = self._start_rows, None
        if start is None:
            raise RuntimeError("start_rows() was already called for this dispatch")
        return start()


class Pending:
    """A dispatch or combine in flight: wait() blocks until its exchange is done and returns the result."""

    def __init__(self, exchange: exchanges.Exchange, finish):
        self.exchange, self._finish, self._result, self._done = exchange, finish, None, False

    def is_completed(self) -> bool:
        return self.exchange.is_completed()

    def wait(self):
        if not self._done:
            self.exchange.wait()
            self._result, self._done, self._finish = self._finish(), True, None
        return self._result


# --------------------------------------------------------------------------------------------------------------------
# The dispatcher
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class DispatchContext:
    """What combine needs to bring the rows home (all index tensors live on x's device)."""
    token: torch.Tensor          # [M_send] source token of each sent row (rows sorted by global expert)
    weight: torch.Tensor         # [M_send] routing weight of each sent row
    n_tokens: int                # N
    send_splits: list[int]       # rows sent to each ep rank
    recv_splits: list[int]       # rows received from each ep rank
    unsort: torch.Tensor         # [M_recv] position in expert order of each row in [source][expert] order


class ExpertParallelDispatcher(Dispatcher):
    """A Dispatcher (parallel/dispatch.py) across the ranks of `ep_group`; this rank's experts are
    [r*E/ep, (r+1)*E/ep) for its rank r in the group.

    fp8: send the dispatch payload as E4M3 1x128 tiles (+ fp32 scales, power-of-two when pow2), dequantized on
    arrival; the combine stays in the activations' precision (V3 §3.3). link: an EmulatedLink that delays every
    exchange (CPU benchmarks). recorder: where exchanges are traced (exchanges.TRACE by default). On NCCL the
    exchanges run on the communicator's own high-priority stream, limited to parallel.comm.sm_budget CTAs
    (parallel/nccl.py).
    """

    def __init__(self, n_experts: int, ep_group, fp8: bool = False, pow2_scales: bool = True,
                 link: Optional[exchanges.EmulatedLink] = None, recorder: Optional[exchanges.CommRecorder] = None,
                 name: str = "moe", layout: str = "counts",
                 capacity: Optional[int] = None):
        if layout not in LAYOUTS:
            raise ValueError(f"parallel.comm.dispatch={layout!r}: must be one of {', '.join(LAYOUTS)}")
        if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0):
            raise ValueError(f"capacity={capacity!r}: must be an int >= 0 (token slots per rank) or None")
        self.layout, self.capacity = layout, capacity
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if n_experts % self.ep:
            raise ValueError(f"model.n_routed_experts={n_experts}: must be a multiple of parallel.ep={self.ep}")
        self.n_experts, self.n_local = n_experts, n_experts // self.ep
        self.fp8, self.pow2, self.link, self.recorder = fp8, pow2_scales, link, recorder
        self.name = name

    @property
    def local_experts(self) -> range:
        return range(self.ep_rank * self.n_local, (self.ep_rank + 1) * self.n_local)

    def _route(self, what: str, out_splits, in_splits, fp8: bool = False) -> _Route:
        return _Route(list(out_splits), list(in_splits), self.group, f"{self.name}.{what}", self.link,
                      self.recorder, fp8, self.pow2)

    # ---------------------------------------------------------------------------------------------------------------
    @property
    def needs_counts(self) -> bool:
        """Whether a dispatch starts with a token-count exchange (layout "counts") before its rows can leave."""
        return self.layout == "counts"

    def start_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> Pending:
        """Start a dispatch; wait() gives (x_sorted [M_recv, C], tokens_per_expert [E_local], ctx).

        Returns once the row exchange is in flight: compute launched before wait() runs under it.
        """
        if self.layout == "padded":
            return self._start_padded(x, topk_idx, topk_weight)
        return self.start_counts(x, topk_idx, topk_weight).start_rows()

    def _permute(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor):
        """The (token, choice) rows sorted by global expert, which also sorts them by destination rank (experts are
        contiguous per rank): (token [M_send], weight [M_send], send_counts [E])."""
        if (x.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]
                or topk_weight.shape != topk_idx.shape):
            raise ValueError(f"dispatch: x [N, C], topk_idx [N, K] and topk_weight [N, K] expected, got "
                             f"{tuple(x.shape)}, {tuple(topk_idx.shape)}, {tuple(topk_weight.shape)}")
        K = topk_idx.shape[1]
        flat = topk_idx.reshape(-1)                                            # [N*K]
        order = torch.argsort(flat, stable=True)
        token = order // K                                                     # [M_send]
        weight = topk_weight.reshape(-1).index_select(0, order)                # [M_send]
        return token, weight, torch.bincount(flat, minlength=self.n_experts)  # [ep * E_local]

    def start_counts(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> "CountsInFlight":
        """First half of start_dispatch (layout "counts"): permute the rows and start the token-count exchange only.
        Compute run before `.start_rows()` (which waits for the counts, then starts the row exchange) hides them."""
        if self.layout != "counts":
            raise RuntimeError(f"start_counts: the {self.layout!r} layout exchanges no counts; use start_dispatch")
        N = x.shape[0]
        ep, E_local = self.ep, self.n_local
        token, weight, send_counts = self._permute(x, topk_idx, topk_weight)
        x_send = x.detach().index_select(0, token)                             # [M_send, C]
        # counts: recv_counts[j, e] = rows rank j sends to my local expert e; .tolist() is the host sync
        recv_counts = torch.empty_like(send_counts)
        counts_route = self._route("counts", [E_local] * ep, [E_local] * ep)
        exchange = exchanges.all_to_all(recv_counts, send_counts, counts_route.out_splits, counts_route.in_splits,
                                   self.group, counts_route.name, self.link, self.recorder)
        return CountsInFlight(lambda: self._start_rows(x, x_send, exchange, recv_counts, send_counts, token, weight,
                                                       N))

    def _start_rows(self, x, x_send, counts_exchange, recv_counts, send_counts, token, weight, N) -> Pending:
        ep, E_local = self.ep, self.n_local
        counts_exchange.wait()
        recv_counts = recv_counts.view(ep, E_local)
        send_splits = send_counts.view(ep, E_local).sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()
        x_recv = x_send.new_empty(sum(recv_splits), x_send.shape[1])          # [M_recv, C]
        exchange = _start(x_send, self._route("dispatch", recv_splits, send_splits, fp8=self.fp8), x_recv)

        def regroup():
            # [source][local expert] -> [local expert][source]: a stable sort on the local expert id of each row
            expert_of_row = (torch.arange(E_local, device=x_send.device).repeat(ep)
                             .repeat_interleave(recv_counts.reshape(-1)))
            by_expert = torch.argsort(expert_of_row, stable=True)               # [M_recv]
            unsort = torch.empty_like(by_expert)
            unsort[by_expert] = torch.arange(by_expert.numel(), device=x_send.device)
            x_sorted = x_recv.index_select(0, by_expert)                       # [M_recv, C]
            tokens_per_expert = recv_counts.sum(dim=0)                         # [E_local]
            ctx = DispatchContext(token, weight, N, send_splits, recv_splits, unsort)
            return self._sent_from(x, x_sorted, ctx), tokens_per_expert, ctx

        return Pending(exchange, regroup)

    def _start_padded(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> Pending:
        """Layout "padded": every token once to every rank, with its expert choices, in `capacity` fixed slots."""
        token, weight, send_counts = self._permute(x, topk_idx, topk_weight)
        N, K = topk_idx.shape
        ep, E_local, C = self.ep, self.n_local, x.shape[1]
        cap = N if self.capacity is None else self.capacity
        if N > cap:
            # raised on this rank only: its peers are left waiting in the exchange, as with any failed collective
            raise ValueError(f"dispatch: {N} tokens exceed the padded layout's capacity of {cap} per rank")
        # one message row per token slot: its activations (or FP8 tiles + scales), then its K choices (-1: empty)
        choices = topk_idx.new_full((cap, K), -1, dtype=torch.int32)
        choices[:N] = topk_idx
        message = (_fp8_rows(x, self.pow2) if self.fp8
                   else x.detach().contiguous().view(torch.uint8))             # [N, bytes of a token]
        message = torch.cat([message, message.new_zeros(cap - N, message.shape[1])]) if cap > N else message
        message = torch.cat([message, choices.view(torch.uint8)], dim=1)      # [cap, B]
        received = torch.empty(ep * cap, message.shape[1], dtype=torch.uint8, device=x.device)
        exchange = exchanges.all_to_all(received, message.repeat(ep, 1), [cap] * ep, [cap] * ep, self.group,
                                   f"{self.name}.dispatch", self.link, self.recorder)

        def select():
            got = received[:, -4 * K:].contiguous().view(torch.int32)         # [ep*cap, K]
            lo = self.ep_rank * E_local
            mine = (got >= lo) & (got < lo + E_local)                         # [ep*cap, K]
            slot = mine.nonzero()[:, 0]                                        # [M_recv], source-major
            expert = got[mine].long() - lo                                     # [M_recv] local expert of each row
            by_expert = torch.argsort(expert, stable=True)                     # -> [local expert][source][token]
            gather = slot.index_select(0, by_expert)
            rows = received[:, :-4 * K].index_select(0, gather)                # [M_recv, B - 4K] the rows kept
            values = (_from_fp8_rows(rows, C, x.dtype) if self.fp8
                      else rows.contiguous().view(x.dtype))                    # [M_recv, C]
            # [source][expert] order, as combine sends home: a stable sort of the expert-ordered rows by source
            unsort = torch.argsort(gather // cap, stable=True)
            # the host reads split sizes here, once the tokens are on their way (local counts only)
            send_splits = send_counts.view(ep, E_local).sum(dim=1).tolist()
            recv_splits = mine.view(ep, cap * K).sum(dim=1).tolist()
            tokens_per_expert = torch.bincount(expert, minlength=E_local)      # [E_local]
            ctx = DispatchContext(token, weight, N, send_splits, recv_splits, unsort)
            return self._sent_from(x, values, ctx), tokens_per_expert, ctx   # [M_recv, C]

        return Pending(exchange, select)

    def _sent_from(self, x: torch.Tensor, x_sorted: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """x_sorted as a function of x, for autograd: its gradient goes home by start_dispatch_backward."""
        return _arrived(x, x_sorted, lambda grad: self.start_dispatch_backward(grad, ctx).wait())

    def start_combine(self, y_sorted: torch.Tensor, ctx: DispatchContext) -> Pending:
        """Start sending expert outputs home; wait() gives y [N, C] = sum_k w_k * expert_k(x) per token."""
        rows = self.start_combine_rows(y_sorted, ctx)

        def finish():
            y_back = _arrived(y_sorted, rows.wait(), lambda grad: self.start_combine_backward(grad, ctx).wait())
            return self.weighted_sum(y_back, ctx, y_sorted.dtype)

        return Pending(rows, finish)

    def start_combine_rows(self, y_sorted: torch.Tensor, ctx: DispatchContext) -> Pending:
        """The combine's exchange alone, outside autograd: wait() gives the expert outputs back on their tokens'
        rank, y_back [M_send, C] in the order the rows were sent (finish with weighted_sum)."""
        y_recv = y_sorted.detach().index_select(0, ctx.unsort)                 # [M_recv, C] in [source][expert]
        y_back = y_recv.new_empty(sum(ctx.send_splits), y_recv.shape[1])      # [M_send, C]
        exchange = exchanges.all_to_all(y_back, y_recv, ctx.send_splits, ctx.recv_splits, self.group,
                                   f"{self.name}.combine", self.link, self.recorder)
        return Pending(exchange, lambda: y_back)

    def weighted_sum(self, y_back: torch.Tensor, ctx: DispatchContext, dtype: torch.dtype) -> torch.Tensor:
        """y [N, C] = sum_k w_k * expert_k(x) per token, from the rows back home [M_send, C]."""
        return weighted_sum(y_back, ctx.token, ctx.weight, ctx.n_tokens, dtype)

    def start_dispatch_backward(self, g_sorted: torch.Tensor, ctx: DispatchContext) -> Pending:
        """Send the expert-input gradients g_sorted [M_recv, C] home (a combine-direction exchange); wait() gives
        each token's gradient [N, C], the sum over the rows it was copied into."""
        g_recv = g_sorted.index_select(0, ctx.unsort)                          # [M_recv, C], [source][expert]
        g_send = g_recv.new_empty(sum(ctx.send_splits), g_recv.shape[1])       # [M_send, C]
        exchange = exchanges.all_to_all(g_send, g_recv, ctx.send_splits, ctx.recv_splits, self.group,
                                   f"{self.name}.dispatch.backward", self.link, self.recorder)
        return Pending(exchange, lambda: g_send.new_zeros(ctx.n_tokens, g_send.shape[1]).index_add_(0, ctx.token,
                                                                                                   g_send))

    def start_combine_backward(self, g_back: torch.Tensor, ctx: DispatchContext) -> Pending:
        """Send the gradients of the rows back home, g_back [M_send, C], to the ranks that ran their experts (a
        dispatch-direction exchange); wait() gives the expert-output gradients [M_recv, C] in expert order."""
        g_recv = g_back.new_empty(sum(ctx.recv_splits), g_back.shape[1])       # [M_recv, C], [source][expert]
        exchange = exchanges.all_to_all(g_recv, g_back.contiguous(), ctx.recv_splits, ctx.send_splits, self.group,
                                   f"{self.name}.combine.backward", self.link, self.recorder)
        return Pending(exchange, lambda: torch.empty_like(g_recv).index_copy_(0, ctx.unsort, g_recv))

    def dispatch(self, x, topk_idx, topk_weight):
        return self.start_dispatch(x, topk_idx, topk_weight).wait()

    def combine(self, y_sorted, ctx):
        return self.start_combine(y_sorted, ctx).wait()


# --------------------------------------------------------------------------------------------------------------------
# Placing experts and routing groups
# --------------------------------------------------------------------------------------------------------------------

def local_expert_range(n_experts: int, ep: int, ep_rank: int) -> range:
    """The contiguous experts of ep rank `ep_rank`."""
    if ep < 1 or n_experts % ep:
        raise ValueError(f"parallel.ep={ep}: must divide model.n_routed_experts={n_experts}")
    if not 0 <= ep_rank < ep:
        raise ValueError(f"ep_rank={ep_rank}: must be in [0, {ep})")
    n = n_experts // ep
    return range(ep_rank * n, (ep_rank + 1) * n)


def group_ranks(n_group: int, ep: int) -> list[range]:
    """The ep ranks that hold each routing group: group g = experts [g*E/n_group, (g+1)*E/n_group).

    Node-limited routing (V3 §2.1.2, topk_method=noaux_tc): set model.n_group to the number of nodes the ep group
    spans and model.topk_group to M; ranks of a node are contiguous in the ep group (torchrun numbers ranks node by
    node and the mesh keeps that order), so group g is exactly node g's experts and every token reaches at most M
    nodes. n_group = ep makes each rank its own "node" (what the CPU tests use); n_group a multiple of ep puts several
    groups on one rank. Returns ep ranges, one per group.
    """
    if n_group < 1 or ep < 1 or (n_group % ep and ep % n_group):
        raise ValueError(f"model.n_group={n_group}: must divide or be a multiple of parallel.ep={ep} "
                         f"for groups to map onto whole ranks")
    if n_group >= ep:
        per = n_group // ep
        return [range(g // per, g // per + 1) for g in range(n_group)]
    span = ep // n_group
    return [range(g * span, (g + 1) * span) for g in range(n_group)]


def ranks_per_token(topk_idx: torch.Tensor, n_experts: int, ep: int) -> torch.Tensor:
    """[N] number of distinct ep ranks each token is sent to (node-limited routing keeps it <= topk_group)."""
    owner = topk_idx // (n_experts // ep)                                      # [N, K]
    hit = torch.zeros(topk_idx.shape[0], ep, dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, owner, True)
    return hit.sum(dim=1)

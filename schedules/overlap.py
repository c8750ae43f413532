"""Computation-communication overlap inside DualPipe's F&B pairs (V3 §3.2.1, Figure 4).

With expert parallelism every MoE block sends its tokens to the ranks owning their experts and back, twice per
forward and twice per backward. DeepSeek-V3 hides that traffic by pairing the forward of one chunk with the
backward of another: while one chunk's tokens travel, the other chunk computes. To make that possible a MoE
block's forward is cut where the tokens travel:

    attention   h1 = h + MLA(norm(h)),  x = norm(h1),  route(x)     compute
    counts      how many rows go to each expert                    all-to-all (tiny; the host must read it)
    dispatch    rows to the ranks owning their experts             all-to-all
    shared      shared expert(x), needs no travelling token        compute
    experts     routed experts (grouped GEMM)                      compute
    combine     expert outputs back to the tokens' ranks           all-to-all
    residual    h1 + sum_k w_k * expert_k(x) + shared(x)           compute (runs on into the next block)

A chunk's forward is a generator (`part_steps`) that yields each time it has started an exchange and waits for it
only when resumed, because its next piece needs the result. Tensors crossing an exchange are cut from the autograd
graph (detached leaves), so each compute segment back-propagates on its own, and the backward (`backward_steps`)
is a generator too: segment by segment in reverse, with the reverse all-to-all of every exchange started
asynchronously here (not inside autograd, where it would block). `interleave` alternates the two generators turn by
turn; per MoE block each side takes three turns (B = the backward chunk, F = the forward chunk):

    turn   computes                                             leaves in flight   which travels under
    B1     ATTN(B): attention input gradients (+ residual)       COMBINE(B)         F1, B2, F2
    F1     ATTN(F): residual, attention, router                  COUNTS(F)          B2
    B2     SHARED(B): shared expert backward                     -                  -
    F2     SHARED(F), after starting the rows                    DISPATCH(F)        F2, B3
    B3     MLP(B): routed experts backward, then ATTN(W): the    DISPATCH(B)        ATTN(W), F3
           attention weight gradients held back from B1
    F3     MLP(F): routed experts                                COMBINE(F)         next B1

With the padded dispatch layout (parallel.comm.dispatch=padded, no count exchange) F1 starts DISPATCH(F) itself, so
the rows travel under B2, F2 and B3 and the forward chunk's chain per block is one exchange shorter.

Holding the attention's weight gradients back (V3 Figure 4's ATTN(W)) into B3 and giving the shared expert turns of
its own fill the short turns where only a small piece of the other chunk would run; the counts travel under a turn
of their own instead of blocking the host, which on a GPU would also stop it from queueing the other chunk's kernels.
When a schedule already defers weight gradients to W actions (WeightGradStore enabled), they stay there.

Every expert-parallel peer runs the same action list, so the exchanges are issued in the same order everywhere.
The multi-token prediction depths of the last part hold MoE blocks too; `final_steps` cuts them the same way.

Outside an F&B pair (a plain F, then B or BW), the cut pieces are stitched back together (`_Stitch`): the executor
back-propagates the chunk's outputs as usual and the pieces run one after the other.

Recomputation (`recompute=True`, V3 §3.3): RMSNorm outputs and the SwiGLU products silu(gate) * up are not kept for
backward but recomputed there (torch.utils.checkpoint with a policy that keeps GEMM outputs). A layer that defers
its weight gradient (framework/weight_grad.py) holds the weight by handle, not as a saved tensor, so the deferred
gradient lands in the parameter itself, not in the alias a checkpoint hands back: norms and routed experts defer
inside recomputed regions.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Generator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .weight_grad import WeightGradStore, run_backward

Steps = Generator[str, None, object]  # yields a label at each exchange it leaves in flight; returns its result


# --------------------------------------------------------------------------------------------------------------------
# Recomputation (V3 §3.3: RMSNorm and the SwiGLU output are recomputed in backward)
# --------------------------------------------------------------------------------------------------------------------

_aten = torch.ops.aten
_GEMMS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
          _aten._grouped_mm.default}


def _keep_gemm_outputs(ctx, op, *args, **kwargs):
    # GEMM outputs are costly to redo and are the SwiGLU's inputs; everything else (norms, silu, products) is cheap
    return CheckpointPolicy.MUST_SAVE if op in _GEMMS else CheckpointPolicy.PREFER_RECOMPUTE


def recomputed(fn: Callable, *args):
    """fn(*args), keeping for backward only its inputs and GEMM outputs; the rest is recomputed there.

    fn must be free of communication and side effects (it runs twice); its layers may defer their weight
    gradients (see the module doc).
    """
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _keep_gemm_outputs))


def _norm(norm: nn.Module, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    return recomputed(norm, x) if recompute else norm(x)


def _swiglu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _swiglu(mlp: nn.Module, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """mlp(x) for a layers.SwiGLU; with recompute, only silu(gate) * up is recomputed (the linears may defer dW)."""
    if not recompute or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return mlp(x)
    return mlp.down_proj(recomputed(_swiglu_product, mlp.gate_proj(x), mlp.up_proj(x)))


def _routed_experts(experts: nn.Module, x_sorted: torch.Tensor, tokens_per_expert, recompute: bool):
    """experts(x_sorted, tokens_per_expert); with recompute, the grouped GEMMs' outputs are kept and the SwiGLU
    product recomputed. Experts with custom GEMM numerics (linear_fn, e.g. FP8) run as they are."""
    if not recompute or getattr(experts, "linear_fn", None) is not None:
        return experts(x_sorted, tokens_per_expert)
    return recomputed(experts, x_sorted, tokens_per_expert)


# --------------------------------------------------------------------------------------------------------------------
# The tape of one chunk: compute segments separated by exchanges
# --------------------------------------------------------------------------------------------------------------------

def _accumulate_grad(leaf: torch.Tensor, grad: torch.Tensor) -> None:
    leaf.grad = grad if leaf.grad is None else leaf.grad + grad


class _Segment:
    """Compute between two exchanges. `cuts`: (tensor, leaf) for each tensor a later piece reads through a detached
    leaf; `seeds`: (tensor, gradient) for losses made inside (balance losses). Its backward seeds each cut tensor
    with its leaf's gradient, gathered by the later pieces' backward."""

    def __init__(self):
        self.cuts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.seeds: list[tuple[torch.Tensor, torch.Tensor]] = []

    def backward(self) -> None:
        pairs = [(t, leaf.grad) for t, leaf in self.cuts if leaf.grad is not None] + self.seeds
        self.cuts = self.seeds = []
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


class Tape:
    """A chunk's forward, recorded as [segment, exchange, segment, exchange, ..., segment]; exchanges are kept as
    generator functions that run their backward (start the reverse all-to-all, yield, wait, hand the gradient on)."""

    def __init__(self):
        self.entries: list = []
        self.open = _Segment()
        self.out_leaves: list[Optional[torch.Tensor]] = []
        self.released = False
        self.deferred_w: list[Callable[[], None]] = []   # weight gradients of segments already back-propagated

    def cut(self, t: torch.Tensor) -> torch.Tensor:
        """A leaf standing for `t` in later pieces: their backward leaves the gradient of `t` in leaf.grad."""
        if not t.requires_grad:
            return t
        leaf = t.detach().requires_grad_()
        self.open.cuts.append((t, leaf))
        return leaf

    def carry(self, t: torch.Tensor, made_in: _Segment) -> torch.Tensor:
        """`t`, made while segment `made_in` was open, for use in the open segment: itself if that is the same
        segment, else a leaf cut from `made_in` (a segment's graph must not reach into an earlier one's, each
        back-propagates alone)."""
        if made_in is self.open or not t.requires_grad:
            return t
        leaf = t.detach().requires_grad_()
        made_in.cuts.append((t, leaf))
        return leaf

    def seed(self, loss: torch.Tensor, scale: float) -> None:
        """Back-propagate `loss` with gradient `scale` in the open segment's backward."""
        self.open.seeds.append((loss, torch.full_like(loss, scale)))

    def exchange(self, backward: Callable[[], Steps]) -> None:
        """Close the open segment; `backward()` is the exchange's backward, run between the segments' backwards."""
        self.entries.append(self.open)
        self.entries.append(backward)
        self.open = _Segment()

    def finish(self, outputs: Sequence[torch.Tensor]) -> tuple:
        """Close the last segment with the chunk's outputs; returns them stitched to this tape (see _Stitch)."""
        outputs = tuple(outputs)
        self.out_leaves = [self.cut(o) if o.requires_grad else None for o in outputs]
        self.entries.append(self.open)
        self.open = None
        grad_outs = [o for o in outputs if o.requires_grad]
        if not grad_outs:
            return outputs
        # the stitched outputs hang off a fresh leaf, not off the pieces: a caller's backward reaches the pieces only
        # through _Stitch.backward, which runs them segment by segment
        anchor = torch.zeros((), device=grad_outs[0].device, requires_grad=True)
        stitched = iter(_Stitch.apply(self, anchor, *(o.detach() for o in grad_outs)))
        return tuple(next(stitched) if o.requires_grad else o for o in outputs)

    def backward_steps(self, grads: dict[int, Optional[torch.Tensor]]) -> Steps:
        """Backward of the chunk from the gradients of its outputs (index among the stitched outputs -> gradient)."""
        if self.released:
            raise RuntimeError("this chunk was already back-propagated (its pieces are released)")
        self.released = True
        leaves = [leaf for leaf in self.out_leaves if leaf is not None]
        for i, leaf in enumerate(leaves):
            leaf.grad = grads.get(i)
        entries, self.entries = self.entries, []
        while entries:
            entry = entries.pop()
            if isinstance(entry, _Segment):
                self._segment_backward(entry)
            else:
                yield from entry()
        self.run_deferred_w()
        self.out_leaves = []

    def _segment_backward(self, segment: _Segment) -> None:
        """A segment's backward; unless the schedule already defers weight gradients to W actions (the store is
        enabled), the layers' weight gradients are kept for `run_deferred_w` (V3 Figure 4's ATTN(W), MLP(W)): input
        gradients first, so the next exchange starts sooner, and the weight-gradient GEMMs later run under the
        dispatch's backward exchange, where the other chunk's compute alone (its experts) is short."""
        if WeightGradStore.enabled:
            segment.backward()
            return
        outer = WeightGradStore.take_cache()
        WeightGradStore.enabled = True
        try:
            segment.backward()
        finally:
            WeightGradStore.enabled = False
            self.deferred_w += WeightGradStore.take_cache()
            WeightGradStore.cache = outer

    def run_deferred_w(self) -> None:
        funcs, self.deferred_w = self.deferred_w, []
        for f in funcs:
            f()


class _Stitch(torch.autograd.Function):
    """Joins a chunk's cut pieces for callers that back-propagate its outputs the usual way: the backward runs the
    tape's pieces in order, waiting for each exchange at once. The outputs share the last piece's outputs' storage."""

    @staticmethod
    def forward(ctx, tape: Tape, anchor: torch.Tensor, *outputs):
        ctx.tape = tape
        return tuple(o.view_as(o) for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        run_steps(ctx.tape.backward_steps(dict(enumerate(grads))))
        return (None, None) + (None,) * len(grads)


def _tape_of(tensors: Sequence[torch.Tensor]) -> Optional[Tape]:
    """The tape all `tensors` are stitched outputs of, or None."""
    nodes = [t.grad_fn for t in tensors]
    if not nodes or not all(isinstance(n, _Stitch._backward_cls) for n in nodes):
        return None
    return nodes[0].tape if len({id(n.tape) for n in nodes}) == 1 else None


# --------------------------------------------------------------------------------------------------------------------
# Blocks as steps
# --------------------------------------------------------------------------------------------------------------------

def _is_v3_block(layer: nn.Module) -> bool:
    return all(hasattr(layer, n) for n in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp"))


def _is_moe(mlp: nn.Module) -> bool:
    return all(hasattr(mlp, n) for n in ("gate", "experts", "dispatcher", "route"))


def exchanges_async(mlp: nn.Module) -> bool:
    """Whether a MoE layer's dispatcher moves tokens between processes with startable exchanges."""
    return _is_moe(mlp) and hasattr(mlp.dispatcher, "start_dispatch") and hasattr(mlp.dispatcher, "group")


def _attention(block: nn.Module, h: torch.Tensor, recompute: bool) -> torch.Tensor:
    """Block.attention(h) (training: no cache), with the norm recomputable."""
    return h + block.self_attn(_norm(block.input_layernorm, h, recompute), 0, None)


def _take_balance_loss(moe: nn.Module, tape: Tape, scale: float, losses: list) -> None:
    # the balance loss made by route() is back-propagated within its own segment, with the gradient the part's
    # loss scale gives it (stage.AttachLoss does the same when the stage runs in one piece)
    aux = getattr(moe, "aux_loss", None)
    if aux is not None:
        moe.aux_loss = None
        tape.seed(aux, scale)
        losses.append(aux.detach())


def _weighted_sum(y_back: torch.Tensor, ctx, dtype: torch.dtype) -> torch.Tensor:
    """sum_k w_k * expert_k(x) per token from the rows back home [M_send, C] -> [N, C] (ExpertParallelDispatcher's
    combine: fp32 accumulation at least, V3 §3.3)."""
    acc = torch.promote_types(y_back.dtype, torch.float32)
    y = y_back.new_zeros(ctx.n_tokens, y_back.shape[1], dtype=acc)
    y = y.index_add(0, ctx.token, y_back.to(acc) * ctx.weight.to(acc)[:, None])
    return y.to(dtype)


def dense_block(block: nn.Module, h: torch.Tensor, recompute: bool) -> torch.Tensor:
    """A block without exchanges (dense FFN): Block.forward(h), norms and SwiGLU recomputable."""
    if not recompute or not _is_v3_block(block):
        return block(h)
    h = _attention(block, h, recompute)
    return h + _swiglu(block.mlp, _norm(block.post_attention_layernorm, h, recompute), recompute)


def moe_block_steps(block: nn.Module, h: torch.Tensor, tape: Tape, recompute: bool, scale: float,
                    losses: list) -> Steps:
    """One MoE block as steps: yields with its dispatch, then its combine, in flight; returns the block's output.

    Numerically the block's forward (Block.feed_forward(Block.attention(h))); `losses` collects the detached
    balance losses (their gradients are seeded on the tape with `scale`).
    """
    from parallel import comm

    moe, dispatcher = block.mlp, block.mlp.dispatcher
    h1 = _attention(block, h, recompute)
    x = _norm(block.post_attention_layernorm, h1, recompute)
    flat, topk_idx, topk_weight = moe.route(x)                                 # [N, C], [N, K], [N, K]
    _take_balance_loss(moe, tape, scale, losses)

    if not exchanges_async(moe):  # every expert is in this process: nothing travels, nothing to overlap
        if len(moe.experts.expert_ids) != moe.n_experts:
            raise ValueError(f"local_experts={moe.experts.expert_ids!r}: a partial expert set needs an "
                             f"expert-parallel dispatcher (moe.dispatcher)")
        x_sorted, tokens_per_expert, ctx = dispatcher.dispatch(flat, topk_idx, topk_weight)
        y = dispatcher.combine(_routed_experts(moe.experts, x_sorted, tokens_per_expert, recompute), ctx)
        if moe.shared_experts is not None:
            y = y + _swiglu(moe.shared_experts, flat, recompute)
        return h1 + y.view(x.shape)

    # ---- dispatch: rows leave; the routing weights stay (ctx.weight keeps their graph to the leaf `topk_weight`)
    h1, flat, topk_weight = tape.cut(h1), tape.cut(flat), tape.cut(topk_weight)
    if getattr(dispatcher, "needs_counts", True):
        counting = dispatcher.start_counts(flat.detach(), topk_idx, topk_weight)
        yield f"{dispatcher.name}.counts"
        pending = counting.start_rows()
    else:  # padded layout: no counts to wait for, the rows leave at once and travel under three turns
        pending = dispatcher.start_dispatch(flat.detach(), topk_idx, topk_weight)
        yield f"{dispatcher.name}.dispatch"
    # the shared expert needs no travelling token: it runs under its own block's row exchange, and its backward
    # (a segment of its own) has a turn of its own in combine_backward
    shared, shared_segment = None, _Segment()
    if moe.shared_experts is not None:
        shared_out = _swiglu(moe.shared_experts, flat, recompute)             # [N, C]
        shared = shared_out.detach().requires_grad_() if shared_out.requires_grad else shared_out
        if shared_out.requires_grad:
            shared_segment.cuts.append((shared_out, shared))
    yield f"{dispatcher.name}.dispatch"
    x_sorted, tokens_per_expert, ctx = pending.wait()                          # [M_recv, C], [E_local]
    x_sorted = x_sorted.detach().requires_grad_()

    def dispatch_backward() -> Steps:
        # expert-input gradients go back to the tokens' ranks: a combine-direction exchange
        g_sorted = x_sorted.grad if x_sorted.grad is not None else torch.zeros_like(x_sorted)
        g_recv = g_sorted.index_select(0, ctx.unsort)                          # [M_recv, C], [source][expert]
        g_send = g_recv.new_empty(sum(ctx.send_splits), g_recv.shape[1])       # [M_send, C]
        exchange = comm.all_to_all(g_send, g_recv, ctx.send_splits, ctx.recv_splits, dispatcher.group,
                                   f"{dispatcher.name}.dispatch.backward", dispatcher.link, dispatcher.recorder)
        # the weight gradients held back so far (V3 Figure 4's ATTN(W)) run under this exchange: without them only
        # the other chunk's routed experts would
        tape.run_deferred_w()
        yield f"{dispatcher.name}.dispatch.backward"
        exchange.wait()
        # each token's gradient is the sum over the rows it was copied into (the backward of index_select)
        _accumulate_grad(flat, g_send.new_zeros(ctx.n_tokens, g_send.shape[1]).index_add_(0, ctx.token, g_send))

    tape.exchange(dispatch_backward)

    # ---- routed experts
    y_sorted = tape.cut(_routed_experts(moe.experts, x_sorted, tokens_per_expert, recompute))   # [M_recv, C]

    # ---- combine: expert outputs go home in [source rank][expert] order
    y_recv = y_sorted.detach().index_select(0, ctx.unsort)                     # [M_recv, C]
    y_back = y_recv.new_empty(sum(ctx.send_splits), y_recv.shape[1])          # [M_send, C]
    exchange = comm.all_to_all(y_back, y_recv, ctx.send_splits, ctx.recv_splits, dispatcher.group,
                               f"{dispatcher.name}.combine", dispatcher.link, dispatcher.recorder)
    yield f"{dispatcher.name}.combine"
    exchange.wait()
    y_back.requires_grad_()

    def combine_backward() -> Steps:
        # output-row gradients go to the ranks that ran the experts: a dispatch-direction exchange
        g_back = y_back.grad if y_back.grad is not None else torch.zeros_like(y_back)
        g_recv = g_back.new_empty(sum(ctx.recv_splits), g_back.shape[1])       # [M_recv, C], [source][expert]
        exchange = comm.all_to_all(g_recv, g_back, ctx.recv_splits, ctx.send_splits, dispatcher.group,
                                   f"{dispatcher.name}.combine.backward", dispatcher.link, dispatcher.recorder)
        yield f"{dispatcher.name}.combine.backward"
        # a turn of its own for compute that needs no exchange, the shared expert's backward: the other chunk's
        # token counts (or, padded layout, its rows) travel under it
        shared_segment.backward()
        yield f"{dispatcher.name}.combine.backward"
        exchange.wait()
        if isinstance(y_sorted, torch.Tensor) and y_sorted.requires_grad:
            _accumulate_grad(y_sorted, torch.empty_like(g_recv).index_copy_(0, ctx.unsort, g_recv))

    tape.exchange(combine_backward)

    # ---- residual, in MoE.forward's order: combine, + shared, then Block's residual add
    y = _weighted_sum(y_back, ctx, y_sorted.dtype)
    if shared is not None:
        y = y + shared
    return h1 + y.view(x.shape)


def block_steps(layer: nn.Module, h: torch.Tensor, tape: Tape, recompute: bool, scale: float, losses: list) -> Steps:
    """layer(h) as steps: an MoE block cut at its exchanges, any other block in one piece."""
    if _is_v3_block(layer) and _is_moe(layer.mlp):
        return (yield from moe_block_steps(layer, h, tape, recompute, scale, losses))
    return dense_block(layer, h, recompute)


def final_steps(model: nn.Module, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, tape: Tape,
                recompute: bool, scale: float) -> Steps:
    """model.final(h, input_ids, labels) as steps, so that the MoE blocks of the multi-token prediction depths
    exchange their tokens under the other chunk too; the same loss value and metrics as final() (deepseek_v3/
    model.py), and the same gradients but for the output head's (shared by the main and the MTP losses, its uses
    land in different segments and are summed in another order); each depth's balance loss is seeded on its own
    segment like the blocks'."""
    depths = getattr(model, "mtp", ())
    if not len(depths):
        return model.final(h, input_ids, labels)
    from framework.models.deepseek_v3.mtp import depth_inputs, token_loss

    # each head's loss is made where its input is, and read by the last segment through Tape.carry
    h_k, balance = model.norm(h), []
    losses = [(token_loss(model.lm_head(h_k), labels), tape.open)]
    for k, depth in enumerate(depths, start=1):
        ids_k, target_k = depth_inputs(input_ids, labels, k)
        x = depth.project(h_k, model.embed_tokens(ids_k))                      # [B, T, C]
        h_k = depth.shared_head.norm((yield from block_steps(depth.block, x, tape, recompute, scale, balance)))
        losses.append((token_loss(model.lm_head(h_k), target_k), tape.open))
    main, *mtp_losses = [tape.carry(loss, made_in) for loss, made_in in losses]
    mtp = torch.stack(mtp_losses).mean()                                       # 1/D sum_k L_k
    loss, metrics = main + model.mtp_lambda * mtp, {"loss/main": main.detach(), "loss/mtp": mtp.detach()}
    if balance:
        total = balance[0]
        for aux in balance[1:]:
            total = total + aux
        loss = loss + total              # the value only: each balance loss back-propagates from its own segment
        metrics["loss/balance"] = total
    metrics["loss/total"] = loss.detach()
    return loss, metrics


def part_steps(part: nn.Module, x: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
               labels: Optional[torch.Tensor] = None, recompute: bool = False) -> Steps:
    """A pipeline part's forward (schedules/stage.py ModelPart, training) as steps; returns its outputs, stitched.

    Same values as ModelPart.forward: embed (first part) -> blocks -> final and loss (last part), loss scaled by
    part.loss_scale; the balance losses of the part's blocks are added to a last part's loss.
    """
    model = part._model[0]
    tape, losses = Tape(), []
    h = model.embed_tokens(x) if part.first else x
    for layer in part.layers:
        h = yield from block_steps(layer, h, tape, recompute, part.loss_scale, losses)
    if not part.last:
        return tape.finish([h])[0]
    loss, metrics = yield from final_steps(model, h, input_ids, labels, tape, recompute, part.loss_scale)
    if losses:
        total = losses[0]
        for aux in losses[1:]:
            total = total + aux
        loss = loss + total          # the value only: each balance loss back-propagates from its own segment
    part.metrics.append({k: float(v) for k, v in metrics.items()})
    return tape.finish([loss * part.loss_scale])[0]


# --------------------------------------------------------------------------------------------------------------------
# Running steps: alone, or two interleaved
# --------------------------------------------------------------------------------------------------------------------

def run_steps(steps: Steps):
    """Drive steps to the end (each exchange is waited for right after it starts); returns their result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def interleave(first: Steps, second: Steps) -> tuple:
    """Run two step generators, switching to the other whenever one leaves an exchange in flight.

    The order is fixed by the generators alone (never by which exchange finishes first), so every expert-parallel
    peer issues its collectives in the same order. Returns (result of first, result of second).
    """
    gens, results, live, turn = [first, second], [None, None], [True, True], 0
    try:
        while live[0] or live[1]:
            if live[turn]:
                try:
                    next(gens[turn])
                except StopIteration as stop:
                    results[turn], live[turn] = stop.value, False
            turn ^= 1
    finally:
        for g, alive in zip(gens, live):
            if alive:
                g.close()
    return results[0], results[1]


def forward_steps(module: nn.Module, inputs: Sequence) -> Steps:
    """module(*inputs) as steps: the module's own `forward_steps` when it offers them, else one plain step."""
    if hasattr(module, "forward_steps"):
        return (yield from module.forward_steps(*inputs))
    return module(*inputs)


def backward_steps(tensors: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]]) -> Steps:
    """Backward from `tensors` seeded with `grads` (None: ones, for a scalar loss) as steps.

    Stitched outputs of one chunk run its tape with asynchronous exchanges; anything else is one plain backward.
    """
    pairs = [(t, g) for t, g in zip(tensors, grads) if t is not None and t.requires_grad]
    pairs = [(t, torch.ones_like(t) if g is None else g) for t, g in pairs]
    if not pairs:
        return
    tape = _tape_of([t for t, _ in pairs])
    if tape is None:
        run_backward([t for t, _ in pairs], [g for _, g in pairs])
        return
    yield from tape.backward_steps({t.output_nr: g for t, g in pairs})


def overlapped_forward_backward(module0: nn.Module, inputs0: list, criterion0: Optional[Callable], labels0: list,
                                module1: nn.Module, loss1: Optional[torch.Tensor], outputs1: list,
                                output_grads1: list) -> tuple[list, Optional[torch.Tensor]]:
    """The F&B pair with deepseek-ai/DualPipe's hook signature: forward of module0 on inputs0 interleaved with the
    backward of module1's chunk (from loss1, or from outputs1 with output_grads1). Returns (outputs0, loss0).

    The backward goes first: its first exchange (the last block's combine gradient) travels under the forward's
    first attention; from there each side computes while the other's tokens travel (V3 Figure 4).
    """
    if loss1 is None and len(outputs1) != len(output_grads1):
        raise ValueError(f"output_grads1 has {len(output_grads1)} gradients for {len(outputs1)} outputs1: "
                         f"one gradient per output is needed")
    backward = backward_steps([loss1], [None]) if loss1 is not None else backward_steps(outputs1, output_grads1)
    _, outputs0 = interleave(backward, forward_steps(module0, inputs0))
    outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else list(outputs0)
    loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
    return outputs0, loss0

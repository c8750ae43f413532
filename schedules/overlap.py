"""Computation-communication overlap inside DualPipe's F&B pairs (V3 §3.2.1, Figure 4).

With expert parallelism every MoE block sends its tokens to the ranks owning their experts and back, twice per
forward and twice per backward. DeepSeek-V3 hides that traffic by pairing the forward of one chunk with the
backward of another: while one chunk's tokens travel, the other chunk computes. To make that possible a layer's
forward can be cut where its tokens travel. This module knows no model: it holds the protocol and the machinery.

The sub-stage protocol (duck-typed; framework/models/deepseek_v3 implements it):
- `layer.forward_steps(h, tape, recompute)`: the layer's training forward as a generator that yields a label each
  time it has started an exchange and waits for it only when resumed, because its next piece needs the result;
  returns the layer's output. A layer without `forward_steps` runs in one piece.
- `model.final_steps(h, input_ids, labels, tape, recompute)`: the same for what follows the last layer (norm, head,
  multi-token prediction depths, loss); returns (loss, metrics). Without it, `model.final(...)` runs in one piece.
- `recompute`: the layer recomputes its cheap pieces (norms, SwiGLU products) in backward (V3 §3.3).
A layer hands its pieces to the `Tape`: tensors crossing an exchange are cut from the autograd graph (detached
leaves, `tape.cut`), so each compute segment back-propagates on its own; each exchange leaves its backward
(`tape.exchange`), a generator too, which starts the reverse all-to-all asynchronously (not inside autograd, where
it would block) and yields while it travels; losses made inside (MoE balance losses) go to `tape.add_loss`.

`backward_steps` runs a chunk's tape segment by segment in reverse, and `interleave` alternates the two generators
turn by turn; per MoE block each side takes three turns (B = the backward chunk, F = the forward chunk):

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

Outside an F&B pair (a plain F, then B or BW), the cut pieces are stitched back together (`_Stitch`): the executor
back-propagates the chunk's outputs as usual and the pieces run one after the other.
"""
from __future__ import annotations

from typing import Callable, Generator, Optional, Sequence

import torch
import torch.nn as nn

from .weight_grad import WeightGradStore, run_backward, run_weight_grads

Steps = Generator[str, None, object]  # yields a label at each exchange it leaves in flight; returns its result


# --------------------------------------------------------------------------------------------------------------------
# The tape of one chunk: compute segments separated by exchanges
# --------------------------------------------------------------------------------------------------------------------

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
    generator functions that run their backward (start the reverse all-to-all, yield, wait, hand the gradient on).

    `open` is the segment being recorded (an opaque handle for `carry`); `loss_scale` the gradient a loss made
    inside the chunk is back-propagated with (the part's loss scale)."""

    def __init__(self, loss_scale: float = 1.0):
        self.entries: list = []
        self.open = _Segment()
        self.out_leaves: list[Optional[torch.Tensor]] = []
        self.released = False
        self.deferred_w: list[Callable[[], None]] = []   # weight gradients of segments already back-propagated
        self.loss_scale = loss_scale
        self.losses: list[torch.Tensor] = []              # detached values of the losses added so far

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

    def add_loss(self, loss: torch.Tensor) -> None:
        """A loss made inside the chunk (a MoE balance loss): back-propagated from the open segment with gradient
        loss_scale (as stage.AttachLoss does when the chunk runs in one piece); its value is kept for take_losses."""
        self.seed(loss, self.loss_scale)
        self.losses.append(loss.detach())

    def take_losses(self) -> list[torch.Tensor]:
        """The values of the losses added since the last call, in order (for the chunk's loss value)."""
        losses, self.losses = self.losses, []
        return losses

    def aside(self, t: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        """`t`, computed off the chain of segments (under an exchange, from inputs already cut): returns a leaf
        standing for it and the function that back-propagates `t` from that leaf's gradient, for the caller to run
        where it likes (a turn of its own inside an exchange's backward)."""
        segment = _Segment()
        if not t.requires_grad:
            return t, segment.backward
        leaf = t.detach().requires_grad_()
        segment.cuts.append((t, leaf))
        return leaf, segment.backward

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
        run_weight_grads(funcs)


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
# A pipeline part as steps
# --------------------------------------------------------------------------------------------------------------------

def exchanges_async(module: nn.Module) -> bool:
    """Whether `module` (a MoE layer) moves tokens between processes with exchanges it can start and wait for: what
    a chunk's forward can hide under the other chunk of an F&B pair."""
    return bool(getattr(module, "exchanges_tokens", False))


def _layer_steps(layer: nn.Module, h: torch.Tensor, tape: Tape, recompute: bool) -> Steps:
    if hasattr(layer, "forward_steps"):
        return (yield from layer.forward_steps(h, tape, recompute))
    return layer(h)


def _sum(losses: list[torch.Tensor]) -> torch.Tensor:
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total


def part_steps(part: nn.Module, x: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
               labels: Optional[torch.Tensor] = None, recompute: bool = False) -> Steps:
    """A pipeline part's forward (schedules/stage.py ModelPart, training) as steps; returns its outputs, stitched.

    Same values as ModelPart.forward: embed (first part) -> layers -> final and loss (last part), loss scaled by
    part.loss_scale; the balance losses of the part's layers are added to a last part's loss.
    """
    model = part._model[0]
    tape = Tape(loss_scale=part.loss_scale)
    h = model.embed_tokens(x) if part.first else x
    for layer in part.layers:
        h = yield from _layer_steps(layer, h, tape, recompute)
    if not part.last:
        return tape.finish([h])[0]
    losses = tape.take_losses()
    if hasattr(model, "final_steps"):
        loss, metrics = yield from model.final_steps(h, input_ids, labels, tape, recompute)
    else:
        loss, metrics = model.final(h, input_ids, labels)
    if losses:
        loss = loss + _sum(losses)   # the value only: each balance loss back-propagates from its own segment
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

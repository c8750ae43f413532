"""PipelineExecutor against one process running the same model on the same micro-batches (float64).

One spawned gloo group of 2 ranks and one of 4 run every check inside: for each schedule (gpipe, 1f1b, zb1p,
dualpipe, dualpipev) a training step must give the reference's per-micro-batch losses and every parameter's
gradient (after the mirror sum for DualPipe), a forward-only step its losses and outputs, and DualPipe's two
copies of a part must stay bitwise equal after their gradients are summed and an SGD step.
"""
from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from schedules.actions import Action
from schedules.executor import PipelineExecutor
from schedules.registry import build, get_layout
from schedules.weight_grad import WeightGradStore, enable_weight_grad_split
from parallel.mesh import free_port as _free_port
from tests.schedules.hooks import sequential_overlapped_forward_backward

D, FF = 8, 16            # model width, MLP width
MB_SHAPE = (2, 3, D)     # one micro-batch: [batch, seq, hidden]
SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")


# ---------------------------------------------------------------- models
class Block(nn.Module):
    """One model part: a residual MLP, plus a linear applied twice (two weight-gradient closures for one weight, as a
    head shared with MTP leaves). Given labels it returns its own loss (the criterion=None seam)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, FF)
        self.down = nn.Linear(FF, D)
        self.mix = nn.Linear(D, D, bias=False)

    def forward(self, h, y=None):
        out = h + self.down(F.gelu(self.up(h))) + 0.1 * self.mix(torch.tanh(self.mix(h)))   # [b, s, D]; freeable
        return out if y is None else F.mse_loss(out, y)


class HookBlock(Block):
    """A Block offering the deepseek-ai/DualPipe overlap hook; counts how often the executor used it."""
    calls = 0

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        cls.calls += 1
        return sequential_overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1,
                                                      outputs1, output_grads1)


class RecordingBlock(Block):
    """A Block that notes, at each forward, which of its earlier outputs have had their storage released."""

    def __init__(self):
        super().__init__()
        self.outputs, self.released = [], []

    def forward(self, h, y=None):
        self.released.append([o.untyped_storage().nbytes() == 0 for o in self.outputs])
        out = super().forward(h, y)
        self.outputs.append(out)
        return out


class TriBlock(nn.Module):
    """A part whose stages exchange three tensors: two floating (both carry gradients) and integer positions."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, FF)
        self.down = nn.Linear(FF, D)
        self.mix = nn.Linear(D, D, bias=False)

    def forward(self, h, a, pos):
        h2 = h + self.down(torch.tanh(self.up(h + a))) + 0.01 * pos.unsqueeze(-1).to(h.dtype)
        a2 = 0.5 * a + self.mix(h)
        return h2, a2, pos


def mse(out, y):
    return F.mse_loss(out, y)


def tri_loss(h, a, pos, y):
    return F.mse_loss(h, y) + a.square().mean()


def make_parts(cls, n):
    torch.manual_seed(1234)  # same parameters in every process
    return [cls().double() for _ in range(n)]


def make_data(n, tri=False):
    g = torch.Generator().manual_seed(99)
    xs, ys = [], []
    for _ in range(n):
        h = torch.randn(MB_SHAPE, generator=g, dtype=torch.float64)
        y = torch.randn(MB_SHAPE, generator=g, dtype=torch.float64)
        if tri:
            a = torch.randn(MB_SHAPE, generator=g, dtype=torch.float64)
            pos = torch.randint(0, 5, MB_SHAPE[:2], generator=g)
            xs.append((h, a, pos))
        else:
            xs.append((h,))
        ys.append((y,))
    return xs, ys


def reference(parts, xs, ys, loss_fn):
    """Every micro-batch through every part in one process: losses, outputs, and grads summed over micro-batches."""
    ref = copy.deepcopy(parts)
    losses, outputs = [], []
    for x, y in zip(xs, ys):
        out = x
        for p in ref:
            out = p(*out)
            out = (out,) if isinstance(out, torch.Tensor) else out
        loss = loss_fn(*out, *y)
        loss.backward()
        losses.append(loss.detach())
        outputs.append(tuple(o.detach() for o in out))
    return losses, outputs, [[q.grad.clone() for q in p.parameters()] for p in ref]


# ---------------------------------------------------------------- comparisons
def cos_dist(x, y):
    x, y = x.double().flatten(), y.double().flatten()
    return 1 - 2 * (x * y).sum().item() / (x * x + y * y).sum().item()


def assert_grads(module, ref_grads, what):
    for (n, p), g in zip(module.named_parameters(), ref_grads):
        assert p.grad is not None, f"{what}: {n} has no gradient"
        cd = cos_dist(p.grad, g)
        rel = ((p.grad - g).abs().max() / g.abs().max()).item()
        assert cd < 1e-13 and rel <= 1e-10, f"{what}: {n} cosine distance {cd:.3e}, max rel {rel:.3e}"


# ---------------------------------------------------------------- one schedule
def check_schedule(name, pp, rank, tri=False, loss_in_stage=False):
    what = f"{name} pp={pp} rank={rank}" + (" tri" if tri else "") + (" loss-in-stage" if loss_in_stage else "")
    layout = get_layout(name, pp)
    n = 2 * pp + 2 if name == "dualpipe" else 2 * pp + 1
    actions = build(name, pp, n)[rank]
    cls = TriBlock if tri else (HookBlock if name in ("dualpipe", "dualpipev") else Block)
    loss_fn = tri_loss if tri else mse
    parts = make_parts(cls, layout.num_parts)
    xs, ys = make_data(n, tri)
    ref_losses, ref_outputs, ref_grads = reference(parts, xs, ys, loss_fn)

    stages = {s: copy.deepcopy(parts[layout.stage_to_part[s]]) for s in layout.stages_of(rank)}
    for m in stages.values():
        enable_weight_grad_split(m)  # B computes input gradients only; W the rest
    shapes = [MB_SHAPE] * (3 if tri else 1)
    if tri:
        shapes[2] = MB_SHAPE[:2]
    ex = PipelineExecutor(layout, stages, criterion=None if loss_in_stage else loss_fn, p2p_shapes=shapes,
                          p2p_dtype=[torch.float64, torch.float64, torch.int64] if tri else torch.float64)

    # micro-batch -> its first and last stage (DualPipe: the second half enters from the other end)
    def ends(mb):
        first = layout.pp if (name == "dualpipe" and mb >= n // 2) else 0
        last = first + layout.num_parts - 1
        return first, last

    inputs = {mb: xs[mb] for mb in range(n) if ends(mb)[0] in stages}
    labels = {mb: ys[mb] for mb in range(n) if ends(mb)[1] in stages}
    HookBlock.calls = 0
    # a B leaves the weight gradient to its W: before this rank's first W, the weights hold no gradient yet
    first_w = []
    run_w = ex._do_W
    ex._do_W = lambda a: (first_w.append(all(p.grad is None for p in stages[a.stage].parameters()))
                          if not first_w else None, run_w(a))
    res = ex.run(actions, n, inputs, labels, train=True, trace=True)
    del ex._do_W
    w_at = [i for i, a in enumerate(actions) if a.op == "W"]
    if w_at:
        stage = actions[w_at[0]].stage
        only_b_before = all(a.op == "B" for a in actions[:w_at[0]]
                            if (a.op in ("B", "BW") and a.stage == stage) or (a.op == "FB" and a.stage2 == stage))
        assert first_w == [only_b_before], f"{what}: weight gradients before the first W: {first_w}"
    # every activation sent to another rank had its storage released after the send
    assert (res.freed_bytes > 0) == any(a.op == "SEND_F" for a in actions), f"{what}: freed {res.freed_bytes} B"

    # losses on the ranks holding last stages, exactly the micro-batches ending here
    assert sorted(res.losses) == sorted(labels), f"{what}: losses for {sorted(res.losses)}, expected {sorted(labels)}"
    for mb, loss in res.losses.items():
        assert abs(loss.item() - ref_losses[mb].item()) <= 1e-12, f"{what}: loss of micro-batch {mb}"
    if name == "dualpipe":
        sum_copies(stages, layout)
    for s, m in stages.items():
        assert_grads(m, ref_grads[layout.stage_to_part[s]], f"{what} stage {s}")
    if cls is HookBlock:
        assert HookBlock.calls == sum(a.op == "FB" for a in actions), f"{what}: the overlap hook was not used"
    # the trace lists every computation once, in order, with non-negative durations
    computed = [a for a in actions if a.op not in ("SEND_F", "RECV_F", "SEND_B", "RECV_B")]
    assert [sp[2] for sp in res.compute_spans] == computed, f"{what}: trace"
    assert all(0 <= sp[0] <= sp[1] for sp in res.trace)
    # the time spent posting communication is accounted whenever this rank posts any, and is part of the step
    posts = any(a.op in ("SEND_F", "RECV_F", "SEND_B", "RECV_B") for a in actions)
    assert (res.post_s > 0) == posts and res.post_s < res.trace[-1][1] + 1.0, f"{what}: post_s {res.post_s}"

    # forward only: same losses and last-stage outputs; no gradient is touched
    for m in stages.values():
        m.zero_grad(set_to_none=True)
    res = ex.run(actions, n, inputs, labels, train=False, return_outputs=True)
    assert sorted(res.losses) == sorted(labels) == sorted(res.outputs), f"{what}: forward-only results"
    for mb in labels:
        assert abs(res.losses[mb].item() - ref_losses[mb].item()) <= 1e-12, f"{what}: forward-only loss {mb}"
        if not loss_in_stage:
            for o, r in zip(res.outputs[mb], ref_outputs[mb]):
                assert (o - r).abs().max().item() <= 1e-12, f"{what}: forward-only output {mb}"
    assert all(p.grad is None for m in stages.values() for p in m.parameters()), f"{what}: forward-only made grads"

    if name == "dualpipe":
        check_mirror_step(ex, actions, n, inputs, labels, layout, stages, rank, what)


def sum_copies(stages, layout) -> None:
    """The reference for DualPipe's two copies of a part: every rank's gradients gathered, each part's copies added,
    written back. (Two terms: a + b == b + a in floating point, so the order does not matter.)"""
    import torch.distributed as dist

    mine = {layout.stage_to_part[s]: torch.cat([p.grad.flatten() for p in m.parameters()]) for s, m in stages.items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    for s, m in stages.items():
        copies = [g[layout.stage_to_part[s]] for g in every if layout.stage_to_part[s] in g]
        assert len(copies) == 2, f"part {layout.stage_to_part[s]}: {len(copies)} copies"
        total, i = copies[0] + copies[1], 0
        for p in m.parameters():
            p.grad.copy_(total[i:i + p.numel()].view_as(p))
            i += p.numel()


def check_mirror_step(ex, actions, n, inputs, labels, layout, stages, rank, what):
    """MirrorExchange (each part's sum started right after its last backward action) gives sum_copies' gradients
    bit for bit; after one SGD step both copies of each part are still bitwise equal."""
    from parallel.mesh import pair_groups
    from schedules.mirror import build_mirror_exchange, duplicated_parts, last_backward_index

    groups = pair_groups([list(range(layout.pp))], duplicated_parts(layout))
    exchange = build_mirror_exchange(stages, layout, groups, bucket_elems=1)  # a bucket per tensor
    calls, param_calls = [], []
    ex.run(actions, n, inputs, labels, train=True,
           grads_ready=lambda s, ps=None: ((calls if ps is None else param_calls).append(s), exchange.stage_done(s, ps)))
    assert sorted(calls) == sorted(stages), f"{what}: grads_ready for stages {calls}, holds {sorted(stages)}"
    last = last_backward_index(actions)
    ends_with_w = sorted(s for s, i in last.items() if actions[i].op == "W")
    assert sorted(set(param_calls)) == ends_with_w, f"{what}: per-parameter reports {param_calls}, final Ws {ends_with_w}"
    assert min(last.values()) < len(actions) - 1, f"{what}: no part finishes before the end, nothing to overlap"
    assert all(n == len(b) for n, b in zip(exchange._next, exchange.parts)), f"{what}: buckets left for finish()"
    exchange.finish()
    early = {id(p): p.grad.clone() for m in stages.values() for p in m.parameters()}
    for m in stages.values():
        m.zero_grad(set_to_none=True)
    ex.run(actions, n, inputs, labels, train=True)
    sum_copies(stages, layout)
    for s, m in stages.items():
        for p in m.parameters():
            assert torch.equal(p.grad, early[id(p)]), f"{what}: MirrorExchange differs from the reference sum (stage {s})"
    with torch.no_grad():  # plain SGD, written out: torch.optim's first use imports torch._dynamo (seconds)
        for m in stages.values():
            for p in m.parameters():
                p.add_(p.grad, alpha=-0.1)
    mine = {layout.stage_to_part[s]: torch.cat([p.detach().flatten() for p in m.parameters()])
            for s, m in stages.items()}
    everyone = [None] * layout.pp
    dist.all_gather_object(everyone, mine)
    for r, theirs in enumerate(everyone):
        for part, flat in theirs.items():
            if part in mine and r != rank:
                assert torch.equal(flat, mine[part]), f"{what}: copies of part {part} differ after the SGD step"


def check_release_mid_step(pp, rank):
    """On gloo, an activation sent to a rank this one has already received from is released by the main thread once
    a computation has run since its send was posted (those sent earlier are left to the send waiter, whenever it
    sees them done): rank 0 of 1F1B, whose sends follow its forwards and whose first gradient comes back from rank 1
    in its first backward."""
    layout = get_layout("1f1b", pp)
    n = 2 * pp + 1
    actions = build("1f1b", pp, n)[rank]
    torch.manual_seed(1234)
    stages = {rank: RecordingBlock().double()}
    ex = PipelineExecutor(layout, stages, criterion=mse, p2p_shapes=[MB_SHAPE], p2p_dtype=torch.float64)
    xs, ys = make_data(n)
    res = ex.run(actions, n, {mb: xs[mb] for mb in range(n)} if rank == 0 else None,
                 {mb: ys[mb] for mb in range(n)} if rank == pp - 1 else None)
    assert res.freed_bytes > 0 if rank < pp - 1 else res.freed_bytes == 0, f"rank {rank}: freed {res.freed_bytes} B"
    if rank != 0:
        return
    # micro-batch -> (rank 1 heard from when its send was posted, index of the computation its send was posted before)
    sent, pending, heard = {}, [], False
    for i, a in enumerate(actions):
        if a.op == "SEND_F":
            pending.append(a.mb)
        elif a.op in ("F", "B", "BW"):
            sent.update({mb: (heard, i) for mb in pending})
            pending, heard = [], heard or a.op != "F"
    forwards = [i for i, a in enumerate(actions) if a.op == "F"]
    checked = 0
    for k, (i, released) in enumerate(zip(forwards, stages[rank].released)):
        due = [m for m in range(k) if sent[m][0] and sent[m][1] < i]
        assert all(released[m] for m in due), f"1f1b pp={pp} rank 0 at F{k}: released {released}, due {due}"
        checked += len(due)
    assert checked > 0, "no activation was due for release before a later forward"


def check_errors(pp, rank):
    layout = get_layout("1f1b", pp)
    stages = {rank: Block().double()}
    with pytest.raises(ValueError, match="stage_modules"):
        PipelineExecutor(layout, {rank + pp: Block()})
    ex = PipelineExecutor(layout, stages, criterion=mse, p2p_shapes=[MB_SHAPE])
    with pytest.raises(ValueError, match="num_microbatches"):
        ex.run([], 0)
    with pytest.raises(ValueError, match="micro-batch outside"):
        ex.run([Action("F", rank, 3)], 2)
    if rank == 0:
        with pytest.raises(ValueError, match="inputs has no micro-batch 0"):
            ex.run([Action("F", 0, 0)], 1, inputs={})


def test_split_linear_matches_nn_linear():
    """SplitLinear gives nn.Linear's gradients bit for bit, now or (store enabled) when the store's closures run."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3, bias=False)).double()
    split = copy.deepcopy(ref)
    assert enable_weight_grad_split(split) == 2
    assert list(split.state_dict()) == list(ref.state_dict()) and isinstance(split[0], nn.Linear)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    xs = x.detach().clone().requires_grad_()
    ref(x).square().sum().backward()
    for deferred in (False, True):
        split.zero_grad(set_to_none=True)
        xs.grad = None
        WeightGradStore.clear()
        WeightGradStore.enabled = deferred
        split(xs).square().sum().backward()
        WeightGradStore.enabled = False
        assert torch.equal(xs.grad, x.grad)
        if deferred:
            assert all(p.grad is None for p in split.parameters()) and len(WeightGradStore.cache) == 2
            WeightGradStore.flush()
            WeightGradStore.pop()
            assert WeightGradStore.funcs_queue.empty()
        for p, q in zip(split.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)
    with pytest.raises(RuntimeError, match="empty"):
        WeightGradStore.pop()


# ---------------------------------------------------------------- spawned workers
def _worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        for name in SCHEDULES:
            check_schedule(name, world, rank)
        check_schedule("gpipe", world, rank, tri=True)           # several tensors per boundary, one integer
        check_schedule("1f1b", world, rank, loss_in_stage=True)  # the last stage computes its own loss
        check_schedule("dualpipev", world, rank, loss_in_stage=True)
        check_release_mid_step(world, rank)
        check_errors(world, rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_executor_matches_single_process(world):
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)

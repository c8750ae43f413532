"""schedules.compat against one process running the whole model, the way deepseek-ai/DualPipe's examples check it.

A stage is two linears written as a user of that library writes them (weight gradient handed to WeightGradStore
when it is enabled) with an overlapped_forward_backward classmethod. Losses must equal the single-process
reference bit for bit, outputs too, and gradients (after the user sums DualPipe's mirror copies) match in
float64 to a cosine distance < 1e-13. One spawned group of 4 gloo ranks runs everything: sub-groups give
DualPipe on 2 and 4 ranks and DualPipeV on 1, 2, 3 and 4, plus a reversed rank_mapping.

weight_grad_split (the default) on a stage with one plain nn.Linear and one user WeightGradStore linear: losses and
every gradient equal weight_grad_split=False's bit for bit, the plain linear's weight gradient is computed in the
schedule's W actions and nowhere else (closures counted against the action list), the user's layer is left alone.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from schedules import compat
from schedules.compat import (DualPipe, DualPipeV, WeightGradStore, set_p2p_tensor_dtype,
                              set_p2p_tensor_shapes)
from schedules.weight_grad import SplitLinear
from parallel.mesh import free_port as _free_port
from tests.schedules.hooks import sequential_overlapped_forward_backward

HIDDEN, MICRO_BATCH, SEQ = 8, 2, 3
WORLD = 4


class UserLinearFn(torch.autograd.Function):
    """y = x W^T with the weight gradient deferred while WeightGradStore is enabled (the library's protocol)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors

        def weight_grad():
            g = grad_out.flatten(0, -2).T @ x.flatten(0, -2)
            weight.grad = g if weight.grad is None else weight.grad + g

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return grad_out @ weight, None


class UserLinear(nn.Linear):
    def forward(self, x):
        return UserLinearFn.apply(x, self.weight)


class PipelineStage(nn.Module):
    hook_calls = 0

    def __init__(self):
        super().__init__()
        self.linear1 = UserLinear(HIDDEN, 4 * HIDDEN, bias=False)
        self.linear2 = UserLinear(4 * HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x)))

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        cls.hook_calls += 1
        return sequential_overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1,
                                                      outputs1, output_grads1)


def criterion(output, target):
    return F.mse_loss(output, target).clone()


def cal_diff(x, y):
    x, y = x.double(), y.double()
    return 1 - 2 * (x * y).sum().item() / (x * x + y * y).sum().item()


def ref_step(x, labels, model, chunks):
    losses, ys = [], []
    for mx, ml in zip(x.chunk(chunks), labels.chunk(chunks)):
        y = model(mx)
        loss = criterion(y, ml)
        loss.backward()
        ys.append(y.detach())
        losses.append(loss.detach())
    return torch.stack(losses), torch.cat(ys)


def full_model_and_data(num_parts, chunks):
    torch.manual_seed(233)  # identical in every process
    full = nn.Sequential(*[PipelineStage() for _ in range(num_parts)]).double()
    x = torch.randn(chunks * MICRO_BATCH, SEQ, HIDDEN, dtype=torch.float64)
    labels = torch.randn(chunks * MICRO_BATCH, SEQ, HIDDEN, dtype=torch.float64)
    return full, x, labels


def local_copies(full, idx):
    local = nn.Sequential(*[PipelineStage() for _ in idx]).double()
    for m, i in zip(local, idx):
        m.load_state_dict(full[i].state_dict())
    return local


def assert_grads_like(local, full, idx, what):
    """The gradients of the local copies of parts `idx` equal those of the same parts of the full model."""
    ref = dict(full.named_parameters())
    for (n, p), i in zip(local.named_parameters(), [idx[0]] * 2 + [idx[1]] * 2):
        assert cal_diff(p.grad, ref[f"{i}.{n.split('.', 1)[1]}"].grad) < 1e-13, f"{what}: {n}"


def check_dualpipe(group, pp, rank):
    """deepseek-ai/DualPipe's example_dualpipe, in float64 on gloo."""
    chunks = 2 * pp + 2
    full, x, labels = full_model_and_data(pp, chunks)
    loss_ref, out_ref = ref_step(x, labels, full, chunks)
    local = local_copies(full, (rank, pp - 1 - rank))
    pipe = DualPipe(local, process_group=group)
    first, last = rank == 0, rank == pp - 1
    px = x.chunk(2)[0] if first else x.chunk(2)[1] if last else None
    pl = labels.chunk(2)[1] if first else labels.chunk(2)[0] if last else None
    PipelineStage.hook_calls = 0

    loss, outputs = pipe.step(px, num_chunks=chunks, criterion=criterion, labels=(pl,), return_outputs=False)
    what = f"DualPipe pp={pp} rank={rank}"
    if first:
        assert torch.equal(loss, loss_ref.chunk(2)[1]), what
    elif last:
        assert torch.equal(loss, loss_ref.chunk(2)[0]), what
    else:
        assert loss is None, what
    assert outputs is None and PipelineStage.hook_calls > 0, what
    # the user sums the two copies of each part, as the library's example does
    for p0, p1 in zip(local[0].parameters(), local[1].parameters()):
        all0 = [torch.empty_like(p0) for _ in range(pp)]
        all1 = [torch.empty_like(p1) for _ in range(pp)]
        dist.all_gather(all0, p0.grad, group=group)
        dist.all_gather(all1, p1.grad, group=group)
        p0.grad += all1[pp - 1 - rank]
        p1.grad += all0[pp - 1 - rank]
    assert_grads_like(local, full, (rank, pp - 1 - rank), what)
    local.zero_grad()

    with torch.no_grad():
        loss, outputs = pipe.step(px, num_chunks=chunks, criterion=criterion, labels=(pl,), return_outputs=True)
    if first:
        assert torch.equal(loss, loss_ref.chunk(2)[1]) and torch.equal(outputs, out_ref.chunk(2)[1]), what
    elif last:
        assert torch.equal(loss, loss_ref.chunk(2)[0]) and torch.equal(outputs, out_ref.chunk(2)[0]), what
    else:
        assert loss is None and outputs is None, what
    assert all(p.grad is None for p in local.parameters()), f"{what}: inference touched gradients"


def check_dualpipev(group, pp, rank, rank_mapping=None):
    """deepseek-ai/DualPipe's example_dualpipev, in float64 on gloo."""
    chunks = 2 * pp + 1
    full, x, labels = full_model_and_data(2 * pp, chunks)
    loss_ref, out_ref = ref_step(x, labels, full, chunks)
    prank = rank_mapping[rank] if rank_mapping else rank
    local = local_copies(full, (prank, 2 * pp - 1 - prank))
    pipe = DualPipeV(local, process_group=group, rank_mapping=rank_mapping)
    first = prank == 0
    px, pl = (x, labels) if first else (None, None)
    PipelineStage.hook_calls = 0

    loss, outputs = pipe.step(px, num_chunks=chunks, criterion=criterion, labels=(pl,), return_outputs=False)
    what = f"DualPipeV pp={pp} rank={rank} mapping={rank_mapping}"
    assert torch.equal(loss, loss_ref) if first else loss is None, what
    assert outputs is None and PipelineStage.hook_calls > 0, what
    assert_grads_like(local, full, (prank, 2 * pp - 1 - prank), what)
    local.zero_grad()

    with torch.no_grad():
        loss, outputs = pipe.step(px, num_chunks=chunks, criterion=criterion, labels=(pl,), return_outputs=True)
    if first:
        assert torch.equal(loss, loss_ref) and torch.equal(outputs, out_ref), what
    else:
        assert loss is None and outputs is None, what


class MixedStage(nn.Module):
    """A residual MLP block with one plain nn.Linear (deferred only by weight_grad_split), one UserLinear (defers
    through WeightGradStore by itself, whatever the switch says) and a plain nn.Linear applied twice (a tied weight:
    its two deferred contributions must be summed before they reach .grad, as autograd sums them)."""
    hook_calls = 0

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.down = UserLinear(4 * HIDDEN, HIDDEN, bias=False)
        self.mix = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        h = x + self.down(F.gelu(self.up(x)))
        return h + self.mix(torch.tanh(self.mix(h)))

    @classmethod
    def overlapped_forward_backward(cls, *args):
        cls.hook_calls += 1
        return sequential_overlapped_forward_backward(*args)


class DeferredCount:
    """Counts the weight-gradient closures layers hand to WeightGradStore during a step, and the ones that ran
    outside a W action of `executor`; records, for every plain B action, whether it changed the .grad of `watched`."""

    def __init__(self, executor, watched):
        self.ex, self.watched = executor, list(watched)
        self.put = self.ran = self.outside_w = 0
        self.b_changed: list[bool] = []
        self._in_w = False

    def __enter__(self):
        self._put = WeightGradStore.__dict__["put"]
        do_w, do_b, bound_put = self.ex._do_W, self.ex._do_B, WeightGradStore.put

        def put(func):
            self.put += 1

            def ran():
                self.ran += 1
                self.outside_w += not self._in_w

            def counted():
                ran()
                func()
            counted.__dict__.update(func.__dict__)    # keeps the parameters a closure declares it writes
            if hasattr(func, "gradients"):            # what a W calls for a closure that can hand its gradients over
                counted.gradients = lambda: (ran(), func.gradients())[1]
            bound_put(counted)

        def w_action(a):
            self._in_w = True
            try:
                do_w(a)
            finally:
                self._in_w = False

        def b_action(a):
            before = [None if p.grad is None else p.grad.clone() for p in self.watched]
            do_b(a)
            self.b_changed.append(any((g is None) != (p.grad is None) or (g is not None and not torch.equal(g, p.grad))
                                      for g, p in zip(before, self.watched)))

        WeightGradStore.put, self.ex._do_W, self.ex._do_B = put, w_action, b_action
        return self

    def __exit__(self, *exc):
        WeightGradStore.put = self._put
        del self.ex._do_W, self.ex._do_B


def split_backwards(actions) -> int:
    """How many backward computations of this rank's action list leave their weight gradients to a W."""
    return sum(a.op == "B" or (a.op == "FB" and not a.full) for a in actions)


def check_weight_grad_split(group, pp, rank, kind):
    """weight_grad_split=True (the default) against False: the same losses and gradients bit for bit, with the plain
    linear's weight gradient moved from B to W."""
    dualpipe = kind is DualPipe
    parts = pp if dualpipe else 2 * pp
    chunks = 2 * pp + 2
    torch.manual_seed(7)
    full = nn.Sequential(*[MixedStage() for _ in range(parts)]).double()
    x = torch.randn(chunks * MICRO_BATCH, SEQ, HIDDEN, dtype=torch.float64)
    labels = torch.randn(chunks * MICRO_BATCH, SEQ, HIDDEN, dtype=torch.float64)
    loss_ref, out_ref = ref_step(x, labels, full, chunks)
    idx = (rank, parts - 1 - rank)
    first, last = rank == 0, rank == pp - 1
    if dualpipe:
        px = x.chunk(2)[0] if first else x.chunk(2)[1] if last else None
        pl = labels.chunk(2)[1] if first else labels.chunk(2)[0] if last else None
        ref = loss_ref.chunk(2)[1] if first else loss_ref.chunk(2)[0] if last else None
    else:
        px, pl, ref = (x, labels, loss_ref) if first else (None, None, None)
    what = f"{kind.__name__} pp={pp} rank={rank}"

    runs = {}
    for split in (True, False):
        local = nn.Sequential(*[MixedStage() for _ in idx]).double()
        for m, i in zip(local, idx):
            m.load_state_dict(full[i].state_dict())
        pipe = kind(local, process_group=group) if split else kind(local, process_group=group,
                                                                    weight_grad_split=False)
        assert pipe.weight_grad_split is split and pipe.split_layers == (4 if split else 0), what
        assert all(type(m.up) is type(m.mix) is (SplitLinear if split else nn.Linear) and type(m.down) is UserLinear
                   for m in local), f"{what}: only the plain nn.Linear is swapped"
        MixedStage.hook_calls = 0
        with DeferredCount(pipe._executor, [p for m in local for p in (m.up.weight, m.mix.weight)]) as count:
            loss, _ = pipe.step(px, num_chunks=chunks, criterion=criterion, labels=(pl,))
        assert MixedStage.hook_calls > 0, what
        n = split_backwards(pipe._actions[chunks])
        # every split backward hands over the user's closure; with the switch also the plain linears' (mix twice)
        assert n > 0 and count.put == count.ran == n * (4 if split else 1), f"{what}: {count.put} closures"
        assert count.outside_w == 0, f"{what}: a deferred weight gradient ran outside W"
        # with the split a B leaves the plain linears' .grad as it was; without, every B writes it
        assert count.b_changed and all(changed is not split for changed in count.b_changed), \
            f"{what} split={split}: which B actions changed the plain linear's .grad: {count.b_changed}"
        assert torch.equal(loss, ref) if ref is not None else loss is None, what
        runs[split] = (loss, {n: p.grad for n, p in local.named_parameters()})
        if split:
            with torch.no_grad():
                loss, outputs = pipe.step(px, num_chunks=chunks, criterion=criterion, labels=(pl,),
                                          return_outputs=True)
            if not dualpipe and first:
                assert torch.equal(loss, loss_ref) and torch.equal(outputs, out_ref), f"{what}: inference"

    (loss_t, grads_t), (loss_f, grads_f) = runs[True], runs[False]
    assert (loss_t is None and loss_f is None) or torch.equal(loss_t, loss_f), what
    assert grads_t.keys() == grads_f.keys() and len(grads_t) == 10, what
    for name in grads_t:
        assert torch.equal(grads_t[name], grads_f[name]), f"{what}: {name} differs with weight_grad_split"


def check_errors(rank, group3, pair):
    if group3 is not None:
        mixed = (MixedStage(), MixedStage())
        with pytest.raises(ValueError, match="process_group of size 3"):
            DualPipe(mixed, process_group=group3)
        assert all(type(m.up) is nn.Linear for m in mixed), "a refused pipe changed the caller's modules"
    for kind in (DualPipe, DualPipeV):
        mixed = (MixedStage(), MixedStage())
        with pytest.raises(ValueError, match="weight_grad_split='yes': must be True"):
            kind(mixed, process_group=pair, weight_grad_split="yes")
        assert all(type(m.up) is nn.Linear for m in mixed), "a refused pipe changed the caller's modules"
    pipe = DualPipe((PipelineStage().double(), PipelineStage().double()), process_group=pair)
    for bad in (5, 2, 0):  # odd; fewer than 2 * ranks; none
        with pytest.raises(ValueError, match=f"num_chunks={bad}"):
            pipe.step(torch.zeros(1), num_chunks=bad, criterion=criterion)
    with pytest.raises(ValueError, match="criterion=None"):
        pipe.step(torch.zeros(1), num_chunks=4)
    vpipe = DualPipeV((PipelineStage().double(), PipelineStage().double()), process_group=pair)
    with pytest.raises(ValueError, match="num_chunks=3"):
        vpipe.step(torch.zeros(1), num_chunks=3, criterion=criterion)


def _worker(rank, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        # every sub-group is created by every rank, in the same order
        solo = [dist.new_group([r]) for r in range(WORLD)]
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        trio = dist.new_group([0, 1, 2])
        world = dist.group.WORLD

        with pytest.raises(RuntimeError, match="set_p2p_tensor_shapes"):
            DualPipeV((PipelineStage(), PipelineStage()), process_group=solo[rank]).step(
                torch.zeros(1), num_chunks=2, criterion=criterion)
        set_p2p_tensor_shapes([(MICRO_BATCH, SEQ, HIDDEN)])
        set_p2p_tensor_dtype(torch.float64)
        assert compat.TENSOR_DTYPE is torch.float64

        check_dualpipev(solo[rank], 1, 0)                        # every rank alone: pp=1
        check_dualpipe(pairs[rank // 2], 2, rank % 2)            # two pp=2 pipes at once, global ranks 0,1 and 2,3
        check_dualpipev(pairs[rank // 2], 2, rank % 2)
        if rank < 3:
            check_dualpipev(trio, 3, rank)
        check_dualpipe(world, 4, rank)
        check_dualpipev(world, 4, rank)
        check_dualpipev(world, 4, rank, rank_mapping=[3, 2, 1, 0])
        for kind in (DualPipe, DualPipeV):
            check_weight_grad_split(pairs[rank // 2], 2, rank % 2, kind)
            check_weight_grad_split(world, 4, rank, kind)
        check_errors(rank, trio if rank < 3 else None, pairs[rank // 2])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_compat_matches_reference_examples():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)

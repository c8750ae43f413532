"""Run one rank's action list: the only place where a schedule touches torch.distributed.

A schedule (schedules/<name>.py) is data: an ordered list of `Action`s per rank. `PipelineExecutor.run` walks this
rank's list once per training step:

  F   stage forward of one micro-batch; a first stage reads the caller's inputs, a last stage computes the loss
  B   input-gradient backward; layers leave their weight gradient for a later W (framework/weight_grad.py)
  W   runs the weight-gradient closures B left for the same (stage, micro-batch)
  BW  full backward
  FB  forward of one chunk with the backward of another; a stage class may overlap them (the DualPipe hook)
  SEND_* / RECV_*  posted, not waited on: consecutive ones go out together before the next computation (on gloo every
      receive of the step is posted by the end of its first computation), a received tensor is waited for only when a
      computation needs it, and a sent activation's storage is released once the send is done (its autograd graph
      stays, to run backward with the gradient that comes back).

Neighbouring stages on the same rank (DualPipeV's turn) hand tensors over directly, with no communication action.
schedules/mirror.py sums the gradients of DualPipe's two copies of each model part (V3 §3.2.1: rank r holds part r of
one direction and part PP-1-r of the other, so every part lives on two ranks).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from .actions import COMM_OPS, Action, Layout
from .mirror import last_backward_index, used_parameters
from .weight_grad import WeightGradStore, run_weight_grads

Shapes = Sequence[Sequence[int]]
Span = tuple  # (start_s, end_s, Action | str)


@dataclass
class StepResult:
    """What one step produced on this rank.

    losses   micro-batch -> detached loss, for micro-batches whose last stage is on this rank
    outputs  micro-batch -> tuple of detached last-stage outputs (only when asked for)
    trace    (start, end, what) in seconds from the step start: `what` is the Action for a computation, or a
             string "wait <RECV action>" / "wait sends" for time spent blocked on communication
    freed_bytes  activation storage released after its send (what the backward no longer needs to hold)
    start_time   time.time() at the step start, to line up the traces of several processes
    post_s       seconds spent handing sends and receives to the backend (process group send/recv, or batch_isend_irecv), traced steps only
    """
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, tuple] = field(default_factory=dict)
    trace: list[Span] = field(default_factory=list)
    freed_bytes: int = 0
    start_time: float = 0.0
    post_s: float = 0.0

    @property
    def compute_spans(self) -> list[Span]:
        return [s for s in self.trace if isinstance(s[2], Action)]


def _as_tuple(out) -> tuple:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)):
        return tuple(out)
    raise TypeError(f"a pipeline stage must return a tensor or a tuple/list of tensors, got {type(out).__name__}")


def _loss_is_output(loss: torch.Tensor) -> torch.Tensor:
    # The criterion handed to an overlap hook when the last stage computes its own loss from (x, labels).
    return loss


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def _saved_names(node) -> tuple[str, ...]:
    # a built-in node's saved inputs and outputs are attributes _saved_self, _saved_result...; dir() costs ~100 us,
    # and every node of a type has the same ones
    kind = type(node)
    if kind not in _SAVED_NAMES:
        _SAVED_NAMES[kind] = tuple(n for n in dir(node) if n.startswith("_saved_"))
    return _SAVED_NAMES[kind]


def _saved_by_own_node(t: torch.Tensor) -> bool:
    """Whether the op that produced `t` saved `t` for its backward (relu, exp, sigmoid... save their result).

    Releasing such an output's storage would corrupt the backward, so it is kept.
    """
    node = t.grad_fn
    ptr = t.untyped_storage().data_ptr()
    try:
        saved = list(getattr(node, "saved_tensors", ()) or ())            # a custom autograd.Function
        for name in _saved_names(node):
            v = getattr(node, name, None)   # a custom Function's ctx may set a _saved_ attribute on some calls only
            saved += [v] if isinstance(v, torch.Tensor) else list(v) if isinstance(v, (tuple, list)) else []
    except RuntimeError:  # already released or not inspectable: keep the tensor to be safe
        return True
    return any(isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() == ptr for x in saved)


def _freeable(t: torch.Tensor) -> bool:
    # Only a fresh, non-view tensor made inside the stage is released; inputs, leaves and views belong to others.
    return t.grad_fn is not None and t._base is None and not _saved_by_own_node(t)


class _Recv:
    """A posted receive: its buffers, and the requests to wait on before reading them."""

    def __init__(self, action: Action, buffers: list[torch.Tensor]):
        self.action, self.buffers, self.works = action, buffers, []


class _Send:
    """A posted send: the tensors on the wire (kept alive until done) and the activations to release after.

    computed: how many of the step's computations had run when it was posted; watched: handed to the send waiter
    (gloo)."""

    def __init__(self, wire: list[torch.Tensor], frees: list[torch.Tensor], peer: int):
        self.wire, self.frees, self.peer, self.works = wire, frees, peer, []
        self.computed, self.watched = 0, False


class _SendWaiter:
    """A thread that waits for posted sends in order and reports which are done."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._done: set[int] = set()
        self._lock = threading.Lock()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="pipeline-send-waiter", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (send := self._queue.get()) is not None:
            try:
                for w in send.works:
                    w.wait()
            except BaseException as e:  # handed to the main thread at its next look
                self._error = e
            with self._lock:
                self._done.add(id(send))
            self._queue.task_done()
        self._queue.task_done()

    def submit(self, sends: list[_Send]) -> None:
        for send in sends:
            self._queue.put(send)

    def take_done(self, sends: list[_Send], wait: bool) -> list[_Send]:
        if wait:
            self._queue.join()
        if self._error is not None:
            raise self._error
        with self._lock:
            done = [s for s in sends if id(s) in self._done]
            self._done -= {id(s) for s in done}
        return done

    def close(self) -> None:
        # not joined: after a failure a send may never complete, and the thread must not hold the caller
        self._queue.put(None)


class PipelineExecutor:
    """Executes action lists (schedules/actions.py) for the stages this rank holds.

    layout         which rank holds which virtual stage
    stage_modules  virtual stage -> module, exactly the stages `layout` puts on this rank
    group          process group of the pipeline ranks (default: the world); with `rank_mapping`,
                   pipeline rank = rank_mapping[group rank], as in deepseek-ai/DualPipe
    criterion      loss = criterion(*outputs, *labels) at a last stage; None: the last stage module is called as
                   module(*x, *labels) and returns the scalar loss itself
    p2p_shapes     shapes of the tensors one stage sends the next, per micro-batch: a list of shapes (every
                   boundary alike) or {sending stage: list of shapes}; gradients travel with the same shapes
    p2p_dtype      a dtype, or one per tensor (a list), or {sending stage: list}; default: the stages' parameter dtype
    device         where received tensors live; default: the device of the stages' parameters
    free_sent_outputs  release the storage of an activation once it is sent, as deepseek-ai/DualPipe does. Views,
                   leaves and outputs saved by the op that made them (relu, tanh...) are kept; an output that a
                   later op inside the same stage saves is not detected: turn this off for such a stage
    """

    def __init__(self, layout: Layout, stage_modules: dict[int, nn.Module], group=None,
                 rank_mapping: Optional[Sequence[int]] = None, criterion: Optional[Callable] = None,
                 p2p_shapes: Union[Shapes, dict, None] = None, p2p_dtype=None, device=None,
                 free_sent_outputs: bool = True):
        self.layout = layout
        self.group = group
        size = dist.get_world_size(group)
        if size != layout.pp:
            raise ValueError(f"group of size {size} for layout.pp={layout.pp}: the group must hold exactly the "
                             f"pipeline ranks")
        if rank_mapping is None:
            rank_mapping = list(range(size))
        if sorted(rank_mapping) != list(range(size)):
            raise ValueError(f"rank_mapping={list(rank_mapping)!r}: must be a permutation of 0..{size - 1}")
        self.rank = rank_mapping[dist.get_rank(group)]
        # pipeline rank -> rank in the group (what the process group addresses) and global rank (what P2POp does)
        self._group_rank = {p: g for g, p in enumerate(rank_mapping)}
        self._global = [dist.get_global_rank(group, self._group_rank[p]) if group is not None else self._group_rank[p]
                        for p in range(size)]
        # gloo neither coalesces nor needs batch_isend_irecv's checks: its sends and receives are posted on the process
        # group itself, which saves ~0.1 ms of Python per message on a busy host
        self._pg = (group if group is not None else dist.group.WORLD) if dist.get_backend(group) == "gloo" else None

        mine = layout.stages_of(self.rank)
        if sorted(stage_modules) != mine:
            raise ValueError(f"stage_modules keys {sorted(stage_modules)}: pipeline rank {self.rank} holds "
                             f"stages {mine}")
        self.stage_modules = stage_modules
        self.criterion = criterion
        params = [p for m in stage_modules.values() for p in m.parameters()]
        if device is None:
            device = params[0].device if params else "cpu"
        self.device = torch.device(device)
        floats = [p.dtype for p in params if p.is_floating_point()]
        self.p2p_shapes = p2p_shapes
        self.p2p_dtype = p2p_dtype if p2p_dtype is not None else (floats[0] if floats else torch.float32)
        self.free_sent_outputs = free_sent_outputs

    # ------------------------------------------------------------------ public
    def run(self, actions: Sequence[Action], num_microbatches: int, inputs: Optional[dict] = None,
            labels: Optional[dict] = None, train: bool = True, return_outputs: bool = False,
            trace: bool = False, grads_ready: Optional[Callable[[int], None]] = None) -> StepResult:
        """Execute this rank's `actions` for one step; gradients accumulate into the stages' parameters.

        grads_ready(stage), in training, right after the stage's last gradient-writing action (mirror.MirrorExchange
        starts the exchange of DualPipe's two copies there, under the rest of the step); when that action is a W,
        also grads_ready(stage, params) as soon as the listed parameters' gradients are final: first those the W does
        not write, then the ones each of its weight-gradient closures wrote, one closure at a time."""
        if not isinstance(num_microbatches, int) or num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches!r}: must be an integer >= 1")
        mine = set(self.stage_modules)
        for a in actions:
            held = [a.stage] if a.op not in ("RECV_F", "RECV_B") else []
            for s in held + ([a.stage2] if a.stage2 is not None else []):
                if s not in mine:
                    raise ValueError(f"action {a}: stage {s} is not held by pipeline rank {self.rank} "
                                     f"(holds {sorted(mine)})")
            if not 0 <= a.mb < num_microbatches or (a.mb2 is not None and not 0 <= a.mb2 < num_microbatches):
                raise ValueError(f"action {a}: micro-batch outside 0..{num_microbatches - 1} "
                                 f"(num_microbatches={num_microbatches})")

        self._inputs = {mb: _as_tuple(x) for mb, x in (inputs or {}).items()}
        self._labels = {mb: _as_tuple(y) for mb, y in (labels or {}).items()}
        self._train, self._return_outputs = train, return_outputs
        self._result = StepResult()
        self._t0 = time.perf_counter()
        self._result.start_time = time.time()
        self._trace = trace
        self._stage_in: dict = {}      # (stage, mb) -> tuple of the stage's inputs (kept for the input gradient)
        self._stage_out: dict = {}     # (stage, mb) -> outputs kept for backward (or until sent, without grad)
        self._loss_graph: dict = {}    # (last stage, mb) -> loss with its graph, until its backward
        self._out_grads: dict = {}     # (stage, mb) -> gradients of the stage's outputs, handed over locally
        self._in_grads: dict = {}      # (stage, mb) -> gradients of the stage's inputs, waiting for SEND_B
        self._wgrads: dict = {}        # (stage, mb) -> deferred weight-gradient closures, waiting for W
        self._local_in: dict = {}      # (stage, mb) -> input handed over by a neighbouring stage on this rank
        self._recvs: dict = {}         # ("F"|"B", sending stage, mb) -> _Recv, posted and not yet consumed
        self._ops: list = []           # (isend | irecv, tensor, pipeline peer, tag, _Recv | _Send) of the batch being formed
        self._sends: list = []         # posted _Send not yet known to be complete
        self._computed = 0             # computations run so far
        self._heard: set = set()       # pipeline peers a receive of this step has come from
        # gloo reports a send complete only once someone waits for it: the main thread does once that cannot stall on
        # the peer (_gloo_sends_done), and until then a thread does, so that an activation is still released early
        self._send_waiter = _SendWaiter() if dist.get_backend(self.group) == "gloo" else None
        ready_after: dict[int, list[int]] = {}
        self._grads_ready, self._final_w = grads_ready, set()
        if train and grads_ready is not None:
            for stage, i in last_backward_index(actions).items():
                ready_after.setdefault(i, []).append(stage)
                if actions[i].op == "W":
                    self._final_w.add((stage, actions[i].mb))
        WeightGradStore.clear()
        try:
            with torch.enable_grad() if train else torch.no_grad():
                posted: Optional[set[int]] = None     # the receives posted ahead of their place (gloo)
                for i, a in enumerate(actions):
                    if a.op in COMM_OPS:
                        if posted is None or i not in posted:
                            self._post(a)
                        continue
                    self._flush()
                    self._start = None
                    getattr(self, "_do_" + a.op)(a)
                    self._computed += 1
                    if posted is None:
                        posted = self._post_receives_early(actions, i)
                    if trace:
                        end = self._now()
                        self._result.trace.append((self._start if self._start is not None else end, end, a))
                    for stage in ready_after.get(i, ()):
                        grads_ready(stage)
            self._flush()
            self._finish_sends(wait=True)
            self._check_drained()
        finally:
            WeightGradStore.clear()
            if self._send_waiter is not None:
                self._send_waiter.close()
            result, self._result = self._result, None
            self._stage_in = self._stage_out = self._loss_graph = self._out_grads = self._in_grads = None
            self._wgrads = self._local_in = self._recvs = self._ops = self._sends = self._heard = None
            self._inputs = self._labels = None
        return result

    # ------------------------------------------------------------------ computation
    def _do_F(self, a: Action) -> None:
        x = self._stage_inputs(a.stage, a.mb)
        self._begin()
        outputs, loss = self._forward(a.stage, a.mb, x)
        self._after_forward(a.stage, a.mb, x, outputs, loss)

    def _do_B(self, a: Action) -> None:
        self._backward(a.stage, a.mb, split=True)

    def _do_BW(self, a: Action) -> None:
        self._backward(a.stage, a.mb, split=False)

    def _do_W(self, a: Action) -> None:
        if not self._train:
            return
        self._begin()
        key = (a.stage, a.mb)
        if key not in self._wgrads:
            raise RuntimeError(f"action {a}: no B ran for stage {a.stage}, micro-batch {a.mb} before its W")
        funcs = self._wgrads.pop(key)
        if key not in self._final_w or not all(hasattr(f, "params") for f in funcs):
            run_weight_grads(funcs)
            return
        # the stage's last W: report each parameter as soon as its gradient is final, i.e. after the last closure
        # that writes it (a linear called twice in one forward, like a head shared with MTP, leaves two)
        written = {id(p) for f in funcs for p in f.params}
        self._grads_ready(a.stage, [p for p in used_parameters(self.stage_modules[a.stage]) if id(p) not in written])
        run_weight_grads(funcs, lambda done: self._grads_ready(a.stage, done))

    def _do_FB(self, a: Action) -> None:
        """Forward of (stage, mb) with the backward of (stage2, mb2).

        The one place where a forward and a backward meet: a stage class that defines the deepseek-ai/DualPipe
        classmethod `overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
        output_grads1) -> (outputs0, loss0)` runs both halves its own way (e.g. one chunk's all-to-all under the
        other's compute); otherwise the forward runs, then the backward.
        """
        if not self._train:
            self._do_F(Action("F", a.stage, a.mb))
            return
        f_stage, f_mb, b_stage, b_mb, split = a.stage, a.mb, a.stage2, a.mb2, not a.full
        m0, m1 = self.stage_modules[f_stage], self.stage_modules[b_stage]
        hook = getattr(type(m0), "overlapped_forward_backward", None)
        if hook is None or type(m0) is not type(m1):
            self._do_F(Action("F", f_stage, f_mb))
            start = self._start
            self._backward(b_stage, b_mb, split)
            self._start = start
            return

        x = self._stage_inputs(f_stage, f_mb)
        inputs0, criterion0, labels0 = list(x), None, []
        if self.layout.is_last(f_stage):
            labels = self._labels_of(f_mb)
            if self.criterion is not None:
                criterion0, labels0 = self.criterion, list(labels)
            else:  # the stage computes its loss from (x, labels): its single output is the loss
                inputs0, criterion0 = [*x, *labels], _loss_is_output
        tensors1, grads1 = self._backward_seeds(b_stage, b_mb)
        if self.layout.is_last(b_stage):
            loss1, outputs1, output_grads1 = tensors1[0], [], []
        else:
            loss1, outputs1, output_grads1 = None, list(tensors1), list(grads1)
        self._begin()
        WeightGradStore.enabled = split
        try:
            outputs0, loss0 = hook(m0, inputs0, criterion0, labels0, m1, loss1, outputs1, output_grads1)
        finally:
            WeightGradStore.enabled = False
        if self.layout.is_last(f_stage) and loss0 is None:
            raise RuntimeError(f"{type(m0).__name__}.overlapped_forward_backward returned no loss for last "
                               f"stage {f_stage}")
        self._after_forward(f_stage, f_mb, x, _as_tuple(outputs0), loss0)
        self._after_backward(b_stage, b_mb, split)

    def _forward(self, stage: int, mb: int, x: tuple) -> tuple[tuple, Optional[torch.Tensor]]:
        module = self.stage_modules[stage]
        if not self.layout.is_last(stage):
            return _as_tuple(module(*x)), None
        has_labels = self._train or mb in self._labels
        if self.criterion is not None:
            outputs = _as_tuple(module(*x))
            return outputs, (self.criterion(*outputs, *self._labels_of(mb)) if has_labels else None)
        if not has_labels:
            return _as_tuple(module(*x)), None
        loss = module(*x, *self._labels_of(mb))
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise TypeError(f"last stage {stage} ({type(module).__name__}) with criterion=None must return a scalar "
                            f"loss from module(*x, *labels), got {type(loss).__name__}")
        return (loss,), loss

    def _after_forward(self, stage: int, mb: int, x: tuple, outputs: tuple, loss) -> None:
        if self._train:
            self._stage_in[(stage, mb)] = x
        if self.layout.is_last(stage):
            if loss is not None:
                self._result.losses[mb] = loss.detach()
                if self._train:
                    self._loss_graph[(stage, mb)] = loss
            if self._return_outputs:
                self._result.outputs[mb] = tuple(o.detach() for o in outputs)
            return
        nxt = self.layout.next_stage(stage)
        local = self.layout.stage_to_rank[nxt] == self.rank
        if self._train or not local:
            self._stage_out[(stage, mb)] = outputs
        if local:  # the V turn: the next stage's input is this output, cut from this stage's graph
            self._local_in[(nxt, mb)] = tuple(
                o.detach().requires_grad_(self._train and o.requires_grad) for o in outputs)

    def _backward_seeds(self, stage: int, mb: int) -> tuple[tuple, Optional[tuple]]:
        """What to run backward from: (loss,), None at a last stage, else (outputs, their gradients)."""
        if self.layout.is_last(stage):
            return (self._loss_graph.pop((stage, mb)),), None
        outputs = self._stage_out.pop((stage, mb))
        grads = self._stage_out_grads(stage, mb)
        floats = [o for o in outputs if o.is_floating_point()]
        if len(floats) != len(grads):
            raise RuntimeError(f"stage {stage} micro-batch {mb}: {len(floats)} floating outputs but "
                               f"{len(grads)} gradients")
        pairs = [(o, g) for o, g in zip(floats, grads) if o.requires_grad]
        return tuple(o for o, _ in pairs), tuple(g for _, g in pairs)

    def _backward(self, stage: int, mb: int, split: bool) -> None:
        if not self._train:
            return
        tensors, grads = self._backward_seeds(stage, mb)
        self._begin()
        WeightGradStore.enabled = split
        try:
            if tensors:
                torch.autograd.backward(tensors, grads)
        finally:
            WeightGradStore.enabled = False
        self._after_backward(stage, mb, split)

    def _after_backward(self, stage: int, mb: int, split: bool) -> None:
        if split:
            self._wgrads[(stage, mb)] = WeightGradStore.take_cache()
        x = self._stage_in.pop((stage, mb))
        prev = self.layout.prev_stage(stage)
        if prev is None:
            return
        # one gradient per floating input, zeros where the input did not influence the loss: the receiver
        # expects exactly that many tensors
        grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in x if t.is_floating_point())
        if self.layout.stage_to_rank[prev] == self.rank:
            self._out_grads[(prev, mb)] = grads
        else:
            self._in_grads[(stage, mb)] = grads

    # ------------------------------------------------------------------ data a computation needs
    def _stage_inputs(self, stage: int, mb: int) -> tuple:
        if self.layout.is_first(stage):
            if mb not in self._inputs:
                raise ValueError(f"inputs has no micro-batch {mb}: stage {stage} on pipeline rank {self.rank} "
                                 f"is a first stage and needs it (given: {sorted(self._inputs)})")
            return self._inputs[mb]
        if (stage, mb) in self._local_in:
            return self._local_in.pop((stage, mb))
        buffers = self._wait_recv(("F", self.layout.prev_stage(stage), mb))
        if self._train:  # a received activation is a leaf of this stage's graph: its .grad goes back
            for b in buffers:
                if b.is_floating_point():
                    b.requires_grad_(True)
        return tuple(buffers)

    def _stage_out_grads(self, stage: int, mb: int) -> tuple:
        if (stage, mb) in self._out_grads:
            return self._out_grads.pop((stage, mb))
        return tuple(self._wait_recv(("B", self.layout.next_stage(stage), mb)))

    def _labels_of(self, mb: int) -> tuple:
        if mb not in self._labels:
            raise ValueError(f"labels has no micro-batch {mb}: its last stage is on pipeline rank {self.rank} "
                             f"(given: {sorted(self._labels)})")
        return self._labels[mb]

    # ------------------------------------------------------------------ communication
    def _specs(self, sending_stage: int) -> list[tuple[tuple, torch.dtype]]:
        """(shape, dtype) of each tensor the boundary after `sending_stage` carries."""
        shapes = self.p2p_shapes
        if isinstance(shapes, dict):
            shapes = shapes.get(sending_stage)
        if shapes is None:
            raise ValueError(f"p2p_shapes: no shapes for the activations stage {sending_stage} sends; "
                             f"give a list of shapes (every boundary) or {{stage: shapes}}")
        dtypes = self.p2p_dtype
        if isinstance(dtypes, dict):
            dtypes = dtypes.get(sending_stage)
        if isinstance(dtypes, torch.dtype):
            dtypes = [dtypes] * len(shapes)
        if dtypes is None or len(dtypes) != len(shapes):
            raise ValueError(f"p2p_dtype={self.p2p_dtype!r}: need one dtype, or one per shape ({len(shapes)}) "
                             f"for stage {sending_stage}")
        return [(tuple(s), d) for s, d in zip(shapes, dtypes)]

    def _tag(self, kind: str, sending_stage: int, mb: int) -> int:
        # Unique per message, so gloo matches a send to its receive whatever order the two ranks post them in
        # (NCCL ignores tags and matches in order, which the schedule verifier guarantees).
        return (mb * self.layout.num_stages + sending_stage) * 2 + (kind == "B")

    def _post(self, a: Action) -> None:
        """Add a SEND/RECV to the batch being formed; it goes out at the next computation."""
        lay = self.layout
        if a.op in ("SEND_B", "RECV_B") and not self._train:
            return
        other = {"SEND_F": lay.next_stage, "SEND_B": lay.prev_stage}.get(a.op, lambda s: s)(a.stage)
        if other is None or lay.stage_to_rank[other] != a.peer or a.peer == self.rank:
            raise ValueError(f"action {a}: peer {a.peer} does not hold the neighbouring stage {other} "
                             f"(stage_to_rank {lay.stage_to_rank})")
        if a.op in ("SEND_F", "SEND_B"):
            if a.op == "SEND_F":
                key = (a.stage, a.mb)
                tensors = self._stage_out[key] if self._train else self._stage_out.pop(key)
                frees = [t for t in tensors if self._train and self.free_sent_outputs and _freeable(t)]
            else:
                tensors, frees = self._in_grads.pop((a.stage, a.mb)), []
            send = _Send([t.detach().contiguous() for t in tensors], frees, a.peer)
            tag = self._tag(a.op[-1], a.stage, a.mb)
            self._ops += [(dist.isend, w, a.peer, tag, send) for w in send.wire]
            return
        kind = a.op[-1]
        key = (kind, a.stage, a.mb)
        if key in self._recvs:
            raise RuntimeError(f"action {a}: this receive was already posted")
        specs = self._specs(a.stage if kind == "F" else lay.prev_stage(a.stage))
        if kind == "B":  # gradients exist for floating tensors only
            specs = [(s, d) for s, d in specs if d.is_floating_point]
        rec = self._recvs[key] = _Recv(a, [torch.empty(s, dtype=d, device=self.device) for s, d in specs])
        tag = self._tag(kind, a.stage, a.mb)
        self._ops += [(dist.irecv, b, a.peer, tag, rec) for b in rec.buffers]

    def _post_receives_early(self, actions: Sequence[Action], first: int) -> set[int]:
        """On gloo, post every receive of the step that comes after its first computation (`actions[first]`), right
        after it: before any send of the step, since a send follows the computation that makes its tensor. Returns
        their indices in `actions`.

        gloo sends a message only once the receiver has posted its receive: a send posted first is announced, the
        receiver answers when it posts, and only then does the data go, written by gloo's thread. A receive posted
        early turns that into one message, written by the sender at once, and about halves the CPU gloo's threads
        spend per message. Tags are unique per message, so the order receives are posted in does not matter; the
        cost is that every receive buffer of the step is allocated by then. Posting them after the first
        computation rather than before keeps them from delaying it. NCCL matches in order, so its receives stay where
        the schedule puts them."""
        if self._pg is None:
            return set()
        posted = {i for i, a in enumerate(actions) if i > first and a.op in ("RECV_F", "RECV_B")}
        for i in sorted(posted):
            self._post(actions[i])
        self._flush()
        return posted

    def _flush(self) -> None:
        """Post the batch formed so far: on the gloo process group op by op, otherwise as one batch_isend_irecv."""
        if not self._ops:
            self._finish_sends(wait=False)
            return
        ops, self._ops = self._ops, []
        t = self._now() if self._trace else 0.0
        if self._pg is not None:
            for op, tensor, peer, tag, owner in ops:
                post = self._pg.send if op is dist.isend else self._pg.recv
                owner.works.append(post([tensor], self._group_rank[peer], tag))
        else:
            works = dist.batch_isend_irecv([dist.P2POp(op, tensor, self._global[peer], self.group, tag)
                                            for op, tensor, peer, tag, _ in ops])
            if len(works) == len(ops):
                for w, op in zip(works, ops):
                    op[-1].works.append(w)
            else:  # a coalesced batch (NCCL) answers with one request for all its operations
                for owner in {id(op[-1]): op[-1] for op in ops}.values():
                    owner.works += list(works)
        if self._trace:
            self._result.post_s += self._now() - t
        new_sends = list({id(op[-1]): op[-1] for op in ops if isinstance(op[-1], _Send)}.values())
        for send in new_sends:
            send.computed = self._computed
        self._sends += new_sends
        if self._send_waiter is not None:
            # each hand-over wakes the waiter, which then takes the GIL from the main thread: a context switch or two
            # on a busy host. Only an activation to release needs its send seen done early, and only while the peer
            # has not been heard from (see _gloo_sends_done)
            watch = [send for send in new_sends if send.frees and send.peer not in self._heard]
            for send in watch:
                send.watched = True
            self._send_waiter.submit(watch)
        self._finish_sends(wait=False)

    def _wait_recv(self, key: tuple) -> list[torch.Tensor]:
        rec = self._recvs.pop(key, None)
        if rec is None:
            kind, stage, mb = key
            raise RuntimeError(f"no RECV_{kind} of stage {stage} micro-batch {mb} was posted before the computation "
                               f"that needs it (pipeline rank {self.rank})")
        if not rec.works:  # posted in the batch still being formed (cannot happen after _flush, kept for safety)
            self._flush()
        t = self._now()
        for w in rec.works:
            w.wait()
        self._heard.add(rec.action.peer)
        if self._trace:
            self._result.trace.append((t, self._now(), f"wait {rec.action}"))
        return rec.buffers

    def _finish_sends(self, wait: bool) -> None:
        """Release the activations whose sends are done; with `wait`, wait for all of them first."""
        if not self._sends:
            return
        t = self._now()
        if self._send_waiter is not None:
            done = self._gloo_sends_done(wait)
        elif wait:
            for send in self._sends:
                for w in send.works:
                    w.wait()
            done = list(self._sends)
        else:
            done = [send for send in self._sends if all(w.is_completed() for w in send.works)]
        for send in done:
            for out in send.frees:
                # the data has left; the autograd node and the tensor's metadata stay for the backward
                self._result.freed_bytes += out.untyped_storage().nbytes()
                out.untyped_storage().resize_(0)
        ids = {id(d) for d in done}
        self._sends = [send for send in self._sends if id(send) not in ids]
        if wait and self._trace:
            self._result.trace.append((t, self._now(), "wait sends"))

    def _gloo_sends_done(self, wait: bool) -> list[_Send]:
        """The sends known done: the waiter's, and those the main thread can wait for without waiting on the peer.

        gloo writes a message once the receiver's notice that its receive is posted has arrived, and every rank
        posts all its receives before any send of its step (_post_receives_early), on the connection it sends on. So
        once a receive from a peer has completed, its notices have all been read, and every send to it is written or
        being written: its wait takes no longer than the transfer, whatever the peer is doing. Those are waited for
        here once a computation has run since they were posted, so a large message has had that time to go; the
        others (sends that release nothing, to a peer not heard from yet) at the step's end."""
        done = self._send_waiter.take_done([send for send in self._sends if send.watched], wait)
        for send in self._sends:
            if not send.watched and (wait or (send.peer in self._heard and send.computed < self._computed)):
                for w in send.works:
                    w.wait()
                done.append(send)
        return done

    def _check_drained(self) -> None:
        """Everything a step starts must end in it: otherwise the action list was incomplete."""
        left = {"posted receives never used": [str(r.action) for r in self._recvs.values()],
                "weight gradients without W": [f"{s}.{m}" for s, m in self._wgrads],
                "input gradients never sent": [f"{s}.{m}" for s, m in self._in_grads],
                "local hand-overs never used": [f"{s}.{m}" for s, m in list(self._local_in) + list(self._out_grads)]}
        if self._train:
            left["forwards without backward"] = [f"{s}.{m}" for s, m in self._stage_in]
        else:
            left["activations never sent"] = [f"{s}.{m}" for s, m in self._stage_out]
        left = {k: v for k, v in left.items() if v}
        if left:
            raise RuntimeError(f"pipeline rank {self.rank}: the action list left work unfinished: {left}")

    # ------------------------------------------------------------------ timing
    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _begin(self) -> None:
        """Mark where a computation starts, after the waits for its data (those are traced on their own)."""
        if self._start is None:
            self._start = self._now()

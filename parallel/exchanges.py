"""Asynchronous exchanges (all-to-all) for expert parallelism, an emulated link for CPU benchmarks, and the trace
every exchange leaves behind.

Exposed communication = the time compute spent waiting for an exchange; the rest of the exchange ran under compute.
Every exchange records (start, completion, waited) in `TRACE`, so overlap schedules can report both. How that time is
taken depends on who waits (`exchange_clock`): with gloo the host thread blocks in `wait()`, so host clocks measure it;
with NCCL `wait()` returns at once and only makes the compute STREAM wait, so CUDA events measure the stall of that
stream (resolved lazily, when the trace is read, so that timing never synchronizes the GPU in the step).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist


def exchange_clock(device: torch.device | str, backend: str) -> str:
    """How an exchange's exposed time is measured: 'cuda_events' where wait() only orders GPU streams (NCCL on a
    CUDA tensor), 'host' where wait() blocks the calling thread until the data has moved (gloo, CPU or CUDA)."""
    return "cuda_events" if torch.device(device).type == "cuda" and backend == "nccl" else "host"


# --------------------------------------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class ExchangeRecord:
    """One exchange: perf_counter seconds. `end` is the completion (real, or modeled by an EmulatedLink, whichever is
    later); `waited` is how long the caller sat in wait(), i.e. the exposed part of the exchange."""
    name: str
    nbytes: int                     # bytes this rank sent to other ranks (the self-slice moves no data on a link)
    start: float
    end: float = float("nan")
    waited: float = 0.0
    emulated: bool = False
    wait_start: float = float("nan")  # when the caller began to wait()
    pending: Optional[Callable[["ExchangeRecord"], None]] = field(default=None, repr=False, compare=False)

    def resolve(self) -> "ExchangeRecord":
        """Fill in the times measured by CUDA events (blocks until they have happened); no-op for host clocks."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending(self)
        return self

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class CommRecorder:
    """The latest `max_records` ExchangeRecords (a bounded deque: a long run does not grow without end);
    `enabled=False` records nothing."""
    enabled: bool = True
    max_records: int = 100_000
    records: deque = field(default_factory=deque)

    def __post_init__(self):
        self.records = deque(self.records, maxlen=self.max_records)

    def add(self, rec: ExchangeRecord) -> None:
        if self.enabled:
            self.records.append(rec)

    def clear(self) -> None:
        self.records.clear()

    def resolved(self) -> list[ExchangeRecord]:
        """The records with every time filled in (CUDA-event records are resolved here, not in the step)."""
        return [r.resolve() for r in list(self.records)]

    def summary(self, names: Optional[Sequence[str]] = None) -> dict[str, float]:
        """Totals in seconds: comm_s (sum of exchange durations), exposed_s (sum of waits), and the count."""
        recs = [r for r in self.resolved() if names is None or r.name in names]
        return {"exchanges": len(recs), "comm_s": sum(r.duration for r in recs),
                "exposed_s": sum(r.waited for r in recs), "bytes": sum(r.nbytes for r in recs)}


TRACE = CommRecorder()


# --------------------------------------------------------------------------------------------------------------------
# Emulated interconnect
# --------------------------------------------------------------------------------------------------------------------

class EmulatedLink:
    """A modeled interconnect for CPU benchmarks: an exchange of B bytes takes latency + B / bandwidth, with the
    bandwidth in gigaBITS per second as networks quote it (InfiniBand NDR 400 Gb/s = 50 GB/s, V3 §3.2.2).

    Opt-in (parallel.comm.emulate_link={latency_us, gbps}); benchmark reports say when it is on. The delay lies on the
    communication side: the exchange completes at max(real completion, start + modeled time), and only a caller that
    waits before then is held back, so compute launched between start and wait() runs under the modeled transfer.
    """

    def __init__(self, latency_us: float = 0.0, gbps: float = 0.0):
        for key, v in (("latency_us", latency_us), ("gbps", gbps)):
            if not isinstance(v, (int, float)) or v < 0 or v != v:
                raise ValueError(f"parallel.comm.emulate_link.{key}={v!r}: must be a number >= 0")
        self.latency_us, self.gbps = float(latency_us), float(gbps)

    @classmethod
    def from_config(cls, spec) -> Optional["EmulatedLink"]:
        """None for a null spec, else an EmulatedLink from {latency_us, gbps} (unknown keys are an error)."""
        if spec is None:
            return None
        spec = dict(spec)
        unknown = set(spec) - {"latency_us", "gbps"}
        if unknown:
            raise ValueError(f"parallel.comm.emulate_link has unknown keys {sorted(unknown)}: "
                             f"allowed: latency_us, gbps")
        return cls(**spec)

    def seconds(self, nbytes: int) -> float:
        """Modeled transfer time of nbytes: latency + bytes / (gbps * 1e9 / 8); gbps=0 means infinite bandwidth."""
        transfer = nbytes * 8 / (self.gbps * 1e9) if self.gbps > 0 else 0.0
        return self.latency_us * 1e-6 + transfer

    def __repr__(self) -> str:
        return f"EmulatedLink(latency_us={self.latency_us:g}, gbps={self.gbps:g})"


class _CudaEventTimes:
    """The CUDA events of one NCCL exchange, on the GPU's clock:

        launched   on the compute stream when the collective is started (NCCL's stream begins after it)
        completed  on a watcher stream made to wait for NCCL's stream: the data has moved
        waiting    on the compute stream when wait() is called (compute has reached the point that needs the data)
        resumed    on the compute stream right after wait(): it fires when the stream may go on

    so the compute stream's stall is elapsed(waiting, resumed) and the exchange's flight elapsed(launched, completed).
    `event`, `stream_ctx` and `watcher` are injectable so that the arithmetic is tested on CPU.
    """

    _watchers: dict = {}

    def __init__(self, work, device, event=None, stream_ctx=None, watcher=None):
        self.event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self.stream_ctx = stream_ctx or torch.cuda.stream
        device = torch.device(device)
        if watcher is None:
            watcher = self._watchers.get(device)
            if watcher is None:
                watcher = self._watchers[device] = torch.cuda.Stream(device)
        self.launched = self._record()
        with self.stream_ctx(watcher):
            work.wait()                            # the watcher (not compute) waits for NCCL's stream
            self.completed = self._record()
        self.waiting = self.resumed = None

    def _record(self):
        ev = self.event()
        ev.record()
        return ev

    def around_wait(self, work) -> None:
        self.waiting = self._record()
        work.wait()                                # compute stream waits for the collective; the host does not
        self.resumed = self._record()

    def fill(self, rec: "ExchangeRecord") -> None:
        self.resumed.synchronize()
        self.completed.synchronize()
        ms = self.launched.elapsed_time
        rec.end = rec.start + ms(self.completed) * 1e-3
        rec.wait_start = rec.start + ms(self.waiting) * 1e-3
        rec.waited = self.waiting.elapsed_time(self.resumed) * 1e-3


class Exchange:
    """A started exchange: wait() makes the caller wait until it is complete (really, and per the emulated link if
    any), runs the `finish` callback once, records the trace and returns finish's result.

    `work` is the torch.distributed Work of the collective (None for a world of one). `clock` says how the wait is
    measured (`exchange_clock`); with 'cuda_events' the record's times are filled in when the trace is read.
    """

    def __init__(self, name: str, work, nbytes: int, finish: Callable[[], object],
                 link: Optional[EmulatedLink] = None, recorder: Optional[CommRecorder] = None,
                 clock: str = "host", device="cpu", events: Optional[dict] = None):
        if clock not in ("host", "cuda_events"):
            raise ValueError(f"Exchange clock={clock!r}: must be 'host' or 'cuda_events'")
        self.record = ExchangeRecord(name, nbytes, time.perf_counter(), emulated=link is not None)
        self.work, self.finish = work, finish
        self.recorder = TRACE if recorder is None else recorder
        self.deadline = self.record.start + (link.seconds(nbytes) if link is not None else 0.0)
        self._completed_at: Optional[float] = None if work is not None else self.record.start
        self._lock = threading.Lock()
        self._result = None
        self._waited = False
        self._gpu = None
        if work is not None and clock == "cuda_events":
            self._gpu = _CudaEventTimes(work, device, **(events or {}))
        elif work is not None:
            # the completion time is stamped by gloo's own thread when the data has moved, even if nobody waits
            work.get_future().add_done_callback(lambda _: self._stamp())

    def _stamp(self) -> None:
        with self._lock:
            if self._completed_at is None:
                self._completed_at = time.perf_counter()

    def is_completed(self) -> bool:
        real = self.work is None or self.work.is_completed()
        return real and time.perf_counter() >= self.deadline

    def wait(self):
        if self._waited:
            return self._result
        if self._gpu is not None:
            self._gpu.around_wait(self.work)
            self.record.pending = self._gpu.fill
        else:
            t0 = time.perf_counter()
            if self.work is not None:
                self.work.wait()
                self._stamp()
            now = time.perf_counter()
            if now < self.deadline:
                time.sleep(self.deadline - now)
            t1 = time.perf_counter()
            self.record.waited, self.record.wait_start = t1 - t0, t0
            self.record.end = max(self._completed_at, self.deadline)
        self.recorder.add(self.record)
        self._result, self._waited = self.finish(), True
        self.finish = None
        return self._result


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
               group, name: str = "all_to_all", link: Optional[EmulatedLink] = None,
               recorder: Optional[CommRecorder] = None,
               finish: Optional[Callable[[], object]] = None) -> Exchange:
    """Start all_to_all_single of rows: inp [sum(in_splits), ...] -> out [sum(out_splits), ...]; returns an Exchange
    whose wait() gives finish() (default: `out`).

    The bytes charged to the link are the larger of what this rank sends to and receives from OTHER ranks (its own
    slice is a local copy): a full-duplex link is busy for the larger direction.
    """
    me = dist.get_rank(group)
    row = math.prod(inp.shape[1:]) * inp.element_size()                # bytes per row
    sent = (sum(in_splits) - in_splits[me]) * row
    received = (sum(out_splits) - out_splits[me]) * row
    work = dist.all_to_all_single(out, inp, list(out_splits), list(in_splits), group=group, async_op=True)
    clock = exchange_clock(inp.device, dist.get_backend(group))
    return Exchange(name, work, max(sent, received), finish or (lambda: out), link, recorder, clock, inp.device)


# --------------------------------------------------------------------------------------------------------------------
# Point-to-point latency
# --------------------------------------------------------------------------------------------------------------------

def ping_pong_s(buf: torch.Tensor, rounds: int, warmup: int = 5, group=None) -> float:
    """One-way seconds of `buf` between ranks 0 and 1 of `group` (half a round trip, median of `rounds` after
    `warmup`) while the other ranks wait; every rank calls it and gets rank 0's figure."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds!r}: must be >= 1")
    rank, times = dist.get_rank(group), []
    if rank < 0 or dist.get_world_size(group) < 2:
        raise ValueError("group: this process must be a member of a group of at least 2 ranks "
                         f"(rank {rank} of {dist.get_world_size(group)})")
    if rank < 2:
        peer = dist.get_global_rank(group, 1 - rank) if group is not None else 1 - rank
        for _ in range(warmup + rounds):
            t = time.perf_counter()
            if rank == 0:
                dist.send(buf, peer, group=group)
                dist.recv(buf, peer, group=group)
            else:
                dist.recv(buf, peer, group=group)
                dist.send(buf, peer, group=group)
            times.append((time.perf_counter() - t) / 2)
    out = [sorted(times[warmup:])[rounds // 2] if times else 0.0]
    dist.broadcast_object_list(out, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return out[0]

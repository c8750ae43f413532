"""Device models: what one accelerator (and its links) can do, kept as data.

Peaks are spec-sheet figures; the fractions of them that real kernels reach are separate, named efficiencies with
their sources, so a plan states its assumptions instead of hiding them in a fudge factor. `cpu` has no spec sheet:
its figures are measured when the planner starts (`measure_cpu`).

Sources (spec sheets, read 2024-2025):
  H100 SXM5  NVIDIA H100 Tensor Core GPU datasheet: BF16 989.4 TFLOPS dense (1979 with sparsity), FP8 1978.9 dense,
             80 GB HBM3 at 3.35 TB/s, NVLink 4 at 900 GB/s (bidirectional, 450 GB/s each way), 132 SMs.
  H800 SXM5  NVIDIA H800 datasheet: the H100 SXM5 die and clocks (989.4 / 1978.9 TFLOPS, 80 GB, 3.35 TB/s, 132 SMs)
             with NVLink cut to 400 GB/s bidirectional (200 each way). V3 §3.2.2 measures 160 GB/s NVLink and
             50 GB/s InfiniBand (one 400 Gb/s NIC per GPU) on DeepSeek's cluster.
  H200 SXM   NVIDIA H200 datasheet: same compute as H100 SXM5, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s, 132 SMs.
  A100 SXM4  NVIDIA A100 datasheet (80 GB): BF16 312 TFLOPS dense, no FP8 tensor cores, HBM2e 2.039 TB/s,
             NVLink 3 at 600 GB/s (300 each way), 108 SMs; HDR InfiniBand 200 Gb/s = 25 GB/s per GPU (DGX A100).
  Hopper nodes: 8 GPUs per node, one 400 Gb/s (50 GB/s) NDR NIC per GPU (DGX H100 / H800 reference design).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

TFLOPS = 1e12
GB = 1e9


@dataclass(frozen=True)
class Efficiencies:
    """Fractions of the spec peaks that the training kernels reach, and where each figure comes from.

    gemm_fp8   DeepGEMM README (H800): grouped FP8 GEMMs of V3's MoE shapes reach 1093-1297 TFLOPS, midpoint
               1195 / 1978.9 = 0.60 (dense shapes up to 1358 = 0.69; we take the MoE figure, most FLOPs are experts).
    gemm_bf16  0.60 as well, for lack of a measured figure in the project's sources: only the head, router and
               embedding-side GEMMs run in BF16 under FP8 (V3 §3.3), so it moves an FP8 plan by a few percent.
    attn_fwd   FlashAttention-3 (Shah et al. 2024): 740 TFLOPS BF16 forward on H100 = 0.75 of 989.
    attn_bwd   0.5: FlashAttention's backward runs well below its forward (FA2 paper: backward reaches ~2/3 of the
               forward's throughput); assumption, 2/3 of attn_fwd.
    hbm        0.8 of the HBM spec for elementwise kernels (norms, SwiGLU, quantize): assumption.
    nvlink     DeepEP normal kernels reach 153-158 GB/s intranode on H800 (NVLink 200 GB/s each way): 0.78.
    ib         DeepEP internode 43-58 GB/s against a 50 GB/s NIC: 0.9 (the upper figures count NVLink forwarding).
    """
    gemm_fp8: float = 0.60
    gemm_bf16: float = 0.60
    attn_fwd: float = 0.75
    attn_bwd: float = 0.50
    hbm: float = 0.80
    nvlink: float = 0.78
    ib: float = 0.90


@dataclass(frozen=True)
class Device:
    """One accelerator and its links. Rates are spec peaks (per second); `eff` says what kernels reach."""
    name: str
    bf16_flops: float                 # dense matmul FLOP/s at the training dtype (fp32 on cpu)
    fp8_flops: float | None           # dense FP8 matmul FLOP/s; None = no FP8 tensor cores (FP8 runs as bf16)
    hbm_bytes_s: float                # memory bandwidth
    memory_bytes: float               # usable memory per device
    nvlink_bytes_s: float             # within a node, each way, per GPU
    ib_bytes_s: float                 # across nodes, each way, per GPU
    link_latency_s: float             # one message across nodes (p2p and all-to-all start-up)
    sms: int                          # streaming multiprocessors (0 on cpu)
    gpus_per_node: int
    fused_kernels: bool               # flash attention, fused cross-entropy, V3's FP8 caching; False = the eager
                                      # torch modules of this project (what runs on cpu)
    op_overhead_s: float = 0.0        # host time per eager operator (cpu: measured; GPUs launch asynchronously)
    action_overhead_s: float = 0.0    # the pipeline executor's own host time per action, p2p waits' bookkeeping
                                      # included (cpu: measured; on GPUs the host queues an action's kernels while
                                      # the device runs the previous one, ~1 ms of Python under ~100 ms actions)
    runtime_bytes: float = 0.0        # memory a trainer process holds before any model tensor (cpu: measured)
    allreduce_s: float = 0.0          # one small all-reduce between the run's processes (cpu: measured; 0 = from
                                      # link_latency_s, a tree of 2 latencies per level)
    gemm_table: tuple = ()            # ((rows, in, out), forward s, input-grad s, weight-grad s) of GEMMs measured
                                      # at the run's own shapes (cpu); spec-sheet devices price GEMMs by FLOPs
    layer_op_s: tuple = ()            # (F, B, W) host seconds per forward operator of the model's own layers
                                      # (cpu: measured, framework/plan/host.py); () = op_overhead_s x (1, 1.2, 0.4)
    logit_s: tuple = ()               # (F, B) seconds per logit of log-softmax and the loss (cpu: measured; its
                                      # exponentials cost ~2x what its memory traffic prices them at)
    zero_s: float = 0.0               # seconds per value of a fresh weight-sized buffer zeroed (cpu: measured)
    eff: Efficiencies = field(default_factory=Efficiencies)
    measured: bool = False

    def gemm_seconds(self, rows: int, k: int, n: int) -> tuple[float, float, float] | None:
        """Measured (forward, input-gradient, weight-gradient) seconds of a [rows, k] x [k, n] linear, if this
        shape was measured."""
        for shape, *times in self.gemm_table:
            if shape == (rows, k, n):
                return tuple(times)
        return None

    def compute_share(self, comm_sms: int) -> float:
        """Share of the SMs left to computation while `comm_sms` run all-to-all (V3 §3.2.2: 20 of 132)."""
        return 1.0 if self.sms == 0 or comm_sms == 0 else (self.sms - comm_sms) / self.sms


_HOPPER = dict(bf16_flops=989.4 * TFLOPS, fp8_flops=1978.9 * TFLOPS, sms=132, gpus_per_node=8, fused_kernels=True,
               link_latency_s=5e-6, ib_bytes_s=50 * GB, runtime_bytes=2.0 * GB)
# runtime_bytes on GPUs: CUDA context, NCCL channels and allocator fragmentation, ~2 GB (assumption; the CUDA
# context alone is ~0.5 GB on Hopper)

DEVICES: dict[str, Device] = {
    "h800": Device("h800", hbm_bytes_s=3.35e12, memory_bytes=80 * GB, nvlink_bytes_s=200 * GB, **_HOPPER),
    "h100": Device("h100", hbm_bytes_s=3.35e12, memory_bytes=80 * GB, nvlink_bytes_s=450 * GB, **_HOPPER),
    "h200": Device("h200", hbm_bytes_s=4.8e12, memory_bytes=141 * GB, nvlink_bytes_s=450 * GB, **_HOPPER),
    "a100": Device("a100", bf16_flops=312 * TFLOPS, fp8_flops=None, hbm_bytes_s=2.039e12, memory_bytes=80 * GB,
                   nvlink_bytes_s=300 * GB, ib_bytes_s=25 * GB, link_latency_s=5e-6, sms=108, gpus_per_node=8,
                   fused_kernels=True, runtime_bytes=2.0 * GB),
}
DEVICE_NAMES = tuple(DEVICES) + ("cpu",)


_MEASURED = Efficiencies(gemm_fp8=1.0, gemm_bf16=1.0, attn_fwd=1.0, attn_bwd=1.0, hbm=1.0, nvlink=1.0, ib=1.0)


PROBE_ROUNDS = 5


def compute_speeds(seconds_per_call, between=lambda: None, shapes=(), rounds: int = PROBE_ROUNDS,
                   host_model=None) -> dict:
    """This CPU's GEMM FLOP/s (a 1024^2 fp32 matmul), memory bytes/s (an elementwise multiply: two reads and a
    write), host seconds per autograd operator and, for each (rows, in, out) of `shapes`, the seconds of that
    linear's forward (x @ w.T), input gradient (g @ w) and weight gradient (g.T @ x), each timed by
    `seconds_per_call(fn, budget_s)`; `between()` runs before each measurement (the probe's processes line up there,
    so they measure together).

    The figures are medians over `rounds` rounds that take turns (GEMM, memory, operators, shapes, then again):
    a moment of interference on a shared machine moves one round, not the plan; `flops_spread` is the GEMM's
    (max - min) / median over the rounds. With `host_model` (a model config), also the host seconds per operator of
    that model's own layers in F, B and W (framework/plan/host.py), as `layer_op_s`."""
    import statistics

    import torch

    n = 1024
    a = torch.randn(n, n)
    x, y = torch.randn(4 * 2**20), torch.randn(4 * 2**20)
    w = torch.ones(8, requires_grad=True)
    linears = [(shape, torch.randn(shape[0], shape[1]), torch.randn(shape[2], shape[1]),
                torch.randn(shape[0], shape[2])) for shape in shapes]

    def ops():
        z = w
        for _ in range(50):
            z = z * 1.0001
        z.sum().backward()

    samples: dict = {"gemm": [], "hbm": [], "op": []}
    for _ in range(rounds):
        between()
        samples["gemm"].append(seconds_per_call(lambda: a @ a, 0.1))
        between()
        samples["hbm"].append(seconds_per_call(lambda: torch.mul(x, y), 0.05))
        between()
        samples["op"].append(seconds_per_call(ops, 0.05))
        between()
        for shape, inp, weight, grad in linears:
            times = (seconds_per_call(lambda: inp @ weight.t(), 0.01), seconds_per_call(lambda: grad @ weight, 0.01),
                     seconds_per_call(lambda: grad.t() @ inp, 0.01))
            samples.setdefault(shape, []).append(times)
    gemm = [2 * n**3 / t for t in samples["gemm"]]
    table = tuple((shape, *(statistics.median(t[i] for t in samples[shape]) for i in range(3)))
                  for shape, *_ in linears)
    layer_op_s, head = (), {}
    if host_model is not None:
        from framework.plan.host import head_seconds, layer_operator_seconds
        layer_op_s = layer_operator_seconds(host_model, between, rounds) or ()
        head = head_seconds(host_model, seconds_per_call, between, rounds)
    return dict(flops=statistics.median(gemm), flops_spread=(max(gemm) - min(gemm)) / statistics.median(gemm),
                hbm=3 * x.numel() * 4 / statistics.median(samples["hbm"]),
                op_s=statistics.median(samples["op"]) / 101,          # 50 forward + 50 backward nodes + the sum
                gemm_table=table, layer_op_s=tuple(layer_op_s), logit_s=head.get("logit_s", ()),
                zero_s=head.get("zero_s", 0.0))


def _rate(fn, seconds: float = 0.25) -> float:
    """Seconds per call of fn, averaged over about `seconds` of calls after a warm-up. An average, not a best
    time: on a shared machine a run gets the share of the cores that is left, and so does the plan."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return elapsed / calls


_RUNTIME_PROBE = """
import os, resource, sys, tempfile
import torch, torch.distributed as dist
import framework.trainer, hydra  # what a trainer process imports (launch.train composes with Hydra)
from framework.optim.manager import OptimizerStateManager
from matplotlib.figure import Figure
if sys.argv[1] != "disabled":
    import wandb
with tempfile.TemporaryDirectory() as d:
    dist.init_process_group("gloo", init_method="file://" + os.path.join(d, "store"), rank=0, world_size=1)
    w = torch.nn.Parameter(torch.ones(8))
    (w * 2).sum().backward()
    OptimizerStateManager([w]).step()
    dist.destroy_process_group()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def trainer_runtime_bytes(wandb_mode: str = "offline") -> float:
    """Peak RSS of a fresh process that does what a trainer does before its model exists: imports the trainer,
    joins a gloo group, runs autograd and an optimizer step (torch.optim pulls in its compile machinery), loads
    matplotlib for the dashboards and wandb unless disabled."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE, wandb_mode], cwd=root, capture_output=True,
                         text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"measuring a trainer process's memory failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.strip().splitlines()[-1])


def measure_cpu(processes: int = 1, memory_bytes: float | None = None, runtime_bytes: float | None = None,
                wandb_mode: str = "offline", shapes=(), host_model=None) -> Device:
    """The `cpu` device, measured now with the threads one of `processes` trainer processes gets (torchrun sets
    OMP_NUM_THREADS=1 when it starts several): a square fp32 GEMM (as the trainer's MFU does), an elementwise
    multiply of 16 MB tensors (memory bandwidth), the host time of one small autograd operator, and (unless given)
    the memory a trainer process holds before its model (`trainer_runtime_bytes`), and each (rows, in, out) linear
    of `shapes` (the run's own GEMMs, layers.py) in its three passes, and the host time per operator of
    `host_model`'s own layers (framework/plan/host.py) when given.
    With several processes these run in that many processes at once, which also measure gloo's p2p latency and
    bandwidth and the pipeline executor's time per action (framework/plan/probe.py). One process has no links:
    latency 50 us and the copy bandwidth stand in (assumption), and no executor time."""
    import torch

    if processes > 1:
        from framework.plan.probe import measure

        m = measure(processes, shapes=shapes, host_model=host_model)
        if memory_bytes is None:
            memory_bytes = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        return Device("cpu", bf16_flops=m["flops"], fp8_flops=None, hbm_bytes_s=m["hbm"], memory_bytes=memory_bytes,
                      nvlink_bytes_s=m["p2p_bytes_s"], ib_bytes_s=m["p2p_bytes_s"],
                      link_latency_s=m["p2p_latency_s"], sms=0, gpus_per_node=1 << 30, fused_kernels=False,
                      op_overhead_s=m["op_s"], action_overhead_s=m["action_s"], allreduce_s=m["allreduce_s"],
                      gemm_table=m["gemm_table"], layer_op_s=m["layer_op_s"], logit_s=m["logit_s"], zero_s=m["zero_s"],
                      runtime_bytes=trainer_runtime_bytes(wandb_mode) if runtime_bytes is None else runtime_bytes,
                      eff=_MEASURED, measured=True)
    threads = torch.get_num_threads()
    if processes > 1:
        torch.set_num_threads(1)
    try:
        return _measure_cpu(processes, memory_bytes, runtime_bytes, wandb_mode, shapes, host_model)
    finally:
        torch.set_num_threads(threads)


def _measure_cpu(processes: int, memory_bytes: float | None, runtime_bytes: float | None, wandb_mode: str,
                 shapes=(), host_model=None) -> Device:
    m = compute_speeds(_rate, shapes=shapes, host_model=host_model)
    flops, hbm, op_s = m["flops"], m["hbm"], m["op_s"]
    if memory_bytes is None:
        memory_bytes = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return Device("cpu", bf16_flops=flops, fp8_flops=None, hbm_bytes_s=hbm, memory_bytes=memory_bytes,
                  nvlink_bytes_s=hbm / 2, ib_bytes_s=hbm / 2, link_latency_s=50e-6, sms=0, gpus_per_node=1 << 30,
                  fused_kernels=False, op_overhead_s=op_s, gemm_table=m["gemm_table"], layer_op_s=m["layer_op_s"],
                  logit_s=m["logit_s"], zero_s=m["zero_s"],
                  runtime_bytes=trainer_runtime_bytes(wandb_mode) if runtime_bytes is None else runtime_bytes,
                  eff=_MEASURED, measured=True)


def get_device(name: str, memory_gb: float | None = None, gpus_per_node: int | None = None,
               processes: int = 1, wandb_mode: str = "offline", shapes=(), host_model=None) -> Device:
    """A device model by name (`cpu` is measured for `processes` processes sharing this machine, GEMMs also at each
    (rows, in, out) of `shapes`, and the host time per operator of `host_model`'s layers); memory_gb / gpus_per_node override the data when given."""
    if name == "cpu":
        dev = measure_cpu(processes, wandb_mode=wandb_mode, shapes=shapes, host_model=host_model)
    elif name in DEVICES:
        dev = DEVICES[name]
    else:
        raise ValueError(f"cluster.gpu={name!r}: allowed {', '.join(DEVICE_NAMES)}")
    if memory_gb is not None:
        dev = replace(dev, memory_bytes=memory_gb * GB)
    if gpus_per_node is not None:
        dev = replace(dev, gpus_per_node=gpus_per_node)
    return dev

"""The planner against published and measured figures; writes bench/out/plan.md.

    .venv/bin/python -m bench.plan [--steps N] [--skip-cpu] [--cpu-terms]

1. DeepSeek-V3's pre-training setup (V3 §3.1-3.3: 2048 H800, PP16 DualPipe, EP64 over 8 nodes, ZeRO-1 DP, FP8,
   4K sequences, batch 15360) planned with the device data of framework/plan/devices.py, against the paper's
   180K H800 GPU-hours per trillion tokens (V3 Table 1: 2664K GPU-hours for 14.8T tokens) and 80 GB.
2. `make train`'s run on this machine: the configured layout planned with cluster.gpu=cpu (speeds measured now),
   then `torchrun --standalone --nproc-per-node=2 -m launch.train parallel=dualpipe` measured, then planned again
   (the machine is shared: the two plans bracket the run); step time = median after the first 10 steps, memory =
   peak RSS of the largest process.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "plan.md"
V3 = ["model=deepseek_v3_671b", "cluster=v3_h800", "train.seq_len=4096", "train.global_batch_size=15360",
      "train.dtype=bfloat16", "fp8=blockwise", "fp8.dispatch=true", "optim.zero=true", "optim.state.exp_avg=bf16",
      "optim.state.exp_avg_sq=bf16", "parallel.schedule=dualpipe", "parallel.pp=16", "parallel.ep=64",
      "train.micro_batches=120"]
PAPER_GPU_HOURS_PER_T = 2664e3 / 14.8       # V3 Table 1: 180K
CPU_READING = (
    "The cpu device is measured when the planner starts, by as many processes as the run has, at the same time"
    " (framework/plan/probe.py), in 5 interleaved rounds whose medians are taken: a 1024^2 fp32 GEMM, an"
    " elementwise multiply, the host time of one autograd operator and every linear of the run at its own"
    " (rows, in, out) shape in its forward, input-gradient and weight-gradient GEMMs (one thread each, as torchrun"
    " sets it; the slowest process's figures); gloo's p2p latency and bandwidth (a ping-pong of 4 B and 1 MiB"
    " messages) and a small all-reduce; and the pipeline executor's own time per action (a DualPipe step through"
    " schedules.compat whose stages compute next to nothing, inverted through schedules.simulate). A fresh process"
    " measures what a trainer holds before its model. The trainer's per-step bookkeeping (its all-reduces, the"
    " gradient norm, clipping, zero_grad, the bias update) is priced from counted operators. The memory terms are"
    " checked exactly against the optimizer manager and autograd in tests/framework/plan. The machine is shared:"
    " its load (1 min) is in the table, and the two plans bracket the run."
)


def _v3_section() -> str:
    from framework.plan.devices import DEVICES
    from framework.plan.estimate import Planner
    from framework.plan.run import setting_from_config
    from framework.plan.search import table
    from framework.plan.run import make_plans
    from launch.train import check_overrides

    cfg = check_overrides(V3)
    sizes = Planner(cfg.model, DEVICES["h800"], setting_from_config(cfg)).default_parts("dualpipe", 16)
    overrides = V3 + [f"parallel.layers_per_part=[{','.join(map(str, sizes))}]"]
    cfg = check_overrides(overrides)
    plans, given, _ = make_plans(cfg)
    mine = next(p for p in plans if p.layout == given)
    default = make_plans(check_overrides(V3), search=False)[0][0]
    gib80 = 80e9 / 2**30
    lines = [
        "### DeepSeek-V3's pre-training setup (2048 H800)", "",
        "```", "python -m launch.plan " + " ".join(overrides), "```", "",
        "| | GPU-hours / 1T tokens | vs paper | memory per GPU | fits 80 GB | step s | bubble | a2a exposed | MFU (BF16 peak) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| paper (V3 Table 1: 2664K GPU-h / 14.8T) | {PAPER_GPU_HOURS_PER_T:,.0f} | | | yes | | | | |",
    ]
    rows = [("plan: V3 layout, planner's balanced layers " + str(list(sizes)), mine),
            ("plan: V3 layout, launch.train's default split", default)]
    planner = Planner(cfg.model, DEVICES["h800"], setting_from_config(cfg))
    for v, why in ((0.04, "the paper's converged MaxVio_global"), (0.0, "no imbalance")):
        skewed = Planner(cfg.model, DEVICES["h800"], replace(setting_from_config(cfg), expert_imbalance=v))
        rows.append((f"plan: balanced layers, expert imbalance {v} ({why})", skewed.plan(mine.layout)))
    for name, p in rows:
        lines.append(f"| {name} | {p.gpu_hours_per_T:,.0f} | {p.gpu_hours_per_T / PAPER_GPU_HOURS_PER_T - 1:+.1%} | "
                     f"{p.memory.total / 2**30:.1f} GiB of {gib80:.1f} | {'yes' if p.fits else 'no'} | "
                     f"{p.step_s:.2f} | {p.bubble:.1%} | {p.a2a_exposed:.2f} of {p.a2a_total:.2f} s | "
                     f"{p.mfu:.1%} |")
    lines += ["", "The planner's ranking of every layout of the same job (top 8, the V3 row marked):", "",
              table(plans, given, 8), "",
              "Assumed, not fitted (framework/plan/devices.py cites each): spec-sheet peaks (H800: 989 BF16 / 1979 FP8 "
              "TFLOPS, 3.35 TB/s, NVLink 200 GB/s each way, one 50 GB/s NIC per GPU); FP8 GEMMs at 0.60 of peak "
              "(DeepGEMM's grouped MoE figures on H800, 1093-1297 TFLOPS), BF16 GEMMs 0.60, attention 0.75 forward "
              "(FlashAttention-3) and 0.50 backward, 20 of 132 SMs lent to communication while experts are "
              "parallel (V3 §3.2.2), NVLink 0.78 and InfiniBand 0.9 of their rates (DeepEP); activations as V3 "
              "keeps them (FP8 linear inputs, RMSNorm and MLA up-projections recomputed). Expert load imbalance: "
              f"the busiest ep rank receives and computes (1 + MaxVio) x the mean rows, MaxVio = "
              f"{planner.s.expert_imbalance} as measured for loss-free balancing by bench/balance.py (the busiest "
              "expert's excess over 200 steps of deepseek_v3_tiny: an upper bound for V3's 4 experts per rank); "
              "the rows with 0.04 (the paper's converged global figure) and 0 show what the term weighs. F&B "
              "pairs: each MoE block's exchanges hide only under the turns schedules/overlap.py interleaves "
              "(framework/plan/overlap.py), not under the pair's whole compute. Not modelled: kernels below "
              "their published efficiency at V3's shapes, stragglers and restarts (each would slow the real run "
              "down); every rank is timed as the slowest one (pessimistic where parts differ). The "
              "default split of launch.train (remainder layers to the middle parts) leaves the head and MTP on a "
              "full part: the plan says it does not fit, which is why the planner writes its balanced "
              "`layers_per_part` into train_plan.yaml.", ""]
    return "\n".join(lines)


def _plan_cpu(overrides):
    """The configured layout's plan, with the cpu's speeds measured now."""
    from framework.plan.estimate import GiB
    from framework.plan.run import make_plans
    from launch.train import check_overrides

    from framework.plan.estimate import Planner
    from framework.plan.run import setting_from_config

    cfg = check_overrides(overrides)
    plans, _, dev = make_plans(cfg, search=False)
    p = plans[0]
    # the same plan without the executor's time per action: what that term adds
    bare = Planner(cfg.model, replace(dev, action_overhead_s=0.0), setting_from_config(cfg)).plan(p.layout)
    return {"step_s": p.step_s, "rss_gib": p.memory.total / GiB, "runtime_gib": p.memory.runtime / GiB,
            "model_gib": (p.memory.total - p.memory.runtime) / GiB, "gflops": dev.bf16_flops / 1e9,
            "op_us": dev.op_overhead_s * 1e6, "p2p_us": dev.link_latency_s * 1e6,
            "action_us": dev.action_overhead_s * 1e6, "host_s": p.step_s - bare.step_s, "load": os.getloadavg()[0]}


def _cpu_section(steps: int) -> str:
    overrides = ["parallel=dualpipe", f"train.steps={steps}"]
    before = _plan_cpu(overrides)
    run_id = f"plan-check-{int(time.time())}"
    # as `make train` does: the corpus and tokenizer are prepared before the run, not inside its measured process
    subprocess.run([sys.executable, "-m", "launch.prepare_data"], cwd=ROOT, check=True)
    cmd = [str(ROOT / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node=2", "-m", "launch.train", *overrides,
           "logging.console=none"]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "DUET_RUN_ID": run_id})
    after = _plan_cpu(overrides)
    rows = [json.loads(line) for line in open(ROOT / "outputs" / run_id / "metrics.jsonl")]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 10]
    rss = max(r["mem/rss_peak_gb"] for r in rows if "mem/rss_peak_gb" in r)
    measured = statistics.median(times)
    mean = {k: (before[k] + after[k]) / 2 for k in before}
    lines = ["### `make train` on this machine (cluster.gpu=cpu)", "",
             "```", "python -m bench.plan   # plans, runs and plans again:", "python -m launch.plan parallel=dualpipe",
             "torchrun --standalone --nproc-per-node=2 -m launch.train parallel=dualpipe", "```", "",
             "| | step time s | of which executor time per action | peak RSS GiB (model terms + trainer runtime) "
             "| matmul GFLOP/s (2 processes at once) | host us / op | p2p latency us | executor us / action "
             "| load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, p in (("plan before the run", before), ("plan after the run", after), ("plan, mean of the two", mean)):
        lines.append(f"| {name} | {p['step_s']:.3f} ({p['step_s'] / measured - 1:+.0%}) | {p['host_s']:.3f} | "
                     f"{p['rss_gib']:.3f} ({p['rss_gib'] / rss - 1:+.0%}; {p['model_gib']:.3f} + "
                     f"{p['runtime_gib']:.3f}) | {p['gflops']:.1f} | {p['op_us']:.1f} | {p['p2p_us']:.0f} | "
                     f"{p['action_us']:.0f} | {p['load']:.1f} |")
    lines.append(f"| measured ({steps} steps) | {measured:.3f} (median of {len(times)}) | | {rss:.3f} | | | | | |")
    lines += ["", CPU_READING]
    return "\n".join(lines) + "\n"


def cpu_terms() -> str:
    """What each measured term moves in make train's plan, from one start-up: the device as one process measures
    it alone (latency 50 us, no executor time), then the probe's figures added one at a time."""
    import torch

    from framework.plan import devices
    from framework.plan.estimate import Planner
    from framework.plan.run import configured_layout, setting_from_config
    from launch.train import check_overrides

    cfg = check_overrides(["parallel=dualpipe"])
    new = devices.get_device("cpu", processes=2, wandb_mode=cfg.logging.wandb.mode)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        old = devices._measure_cpu(2, None, new.runtime_bytes, cfg.logging.wandb.mode)
    finally:
        torch.set_num_threads(threads)
    rows = [("before: one process measures alone, latency 50 us, no executor time", old),
            ("+ GEMM / bandwidth / operator time measured by 2 processes at once",
             replace(new, link_latency_s=old.link_latency_s, nvlink_bytes_s=old.nvlink_bytes_s,
                     ib_bytes_s=old.ib_bytes_s, action_overhead_s=0.0)),
            ("+ gloo p2p latency and bandwidth measured (median ping-pong)", replace(new, action_overhead_s=0.0)),
            ("+ executor time per action (the plan)", new)]
    lines = [f"load (1 min) {os.getloadavg()[0]:.1f}", "",
             "| cpu device | planned step s | matmul GFLOP/s | p2p latency us | executor us / action |",
             "|---|---|---|---|---|"]
    for name, dev in rows:
        planner = Planner(cfg.model, dev, setting_from_config(cfg))
        step = planner.plan(configured_layout(cfg)).step_s
        lines.append(f"| {name} | {step:.3f} | {dev.bf16_flops / 1e9:.1f} | {dev.link_latency_s * 1e6:.0f} | "
                     f"{dev.action_overhead_s * 1e6:.0f} |")
    return "\n".join(lines)


# -- where a step's time goes: the run timed term by term, against the same terms of the plan ---------------------

def _breakdown_worker(steps: int, out: str) -> None:
    """Under torchrun: make train's job for `steps` steps with the trainer's parts timed and every step's actions
    traced; each rank writes the medians (after 10 steps) of its per-step seconds to out/<rank>.json."""
    import re
    import tempfile

    import torch.distributed as dist

    from framework.parallelize import build_mesh
    from framework.trainer import Trainer
    from launch.train import check_overrides

    cfg = check_overrides(["parallel=dualpipe", f"train.steps={steps}", "logging.console=none", "train.resume=none",
                           "train.checkpoint_interval=0", "train.eval_interval=0", "logging.wandb.mode=disabled"])
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.train.output_dir = run_dir
        trainer = Trainer(cfg, build_mesh(cfg))
        rank = dist.get_rank()
        per_step: dict[str, list[float]] = {}
        current: dict[str, float] = {}

        def timed(obj, name, key):
            fn = getattr(obj, name)

            def run(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    current[key] = current.get(key, 0.0) + time.perf_counter() - t0
            setattr(obj, name, run)

        step_fn = trainer.step_fn
        forward_backward = step_fn.forward_backward

        def traced(micro_batches, trace=False):
            out = forward_backward(micro_batches, trace=True)
            for start, end, what in out.timeline[1]:
                key = "waits" if what.startswith("wait") else re.sub(r"[0-9.]", "", what).replace("&BW", "&B")
                current[key] = current.get(key, 0.0) + end - start
            return out
        step_fn.forward_backward = traced
        timed(step_fn, "forward_backward", "pipeline")
        timed(step_fn.executor, "run", "executor")
        if step_fn.mirror is not None:
            timed(step_fn.mirror, "finish", "mirror")
        timed(trainer.optimizer, "step", "optimizer")
        train_step = trainer.train_step

        def step(micro_batches):
            current.clear()
            t0 = time.perf_counter()
            out = train_step(micro_batches)
            current["step"] = time.perf_counter() - t0
            for k, v in current.items():
                per_step.setdefault(k, []).append(v)
            return out
        trainer.train_step = step
        trainer.fit()
    medians = {k: statistics.median(v[10:]) for k, v in per_step.items() if len(v) > 10}
    Path(out, f"{rank}.json").write_text(json.dumps(medians))


def breakdown(steps: int = 60) -> str:
    """Plan make train's job, run it with its parts timed (`_breakdown_worker`), and put each measured term next to
    the plan's: per action type, the executor's own time and waits, the optimizer, the trainer's bookkeeping."""
    import tempfile

    from framework.plan.estimate import _actions
    from framework.plan.run import make_plans
    from launch.train import check_overrides

    cfg = check_overrides(["parallel=dualpipe"])
    plans, _, dev = make_plans(cfg, search=False)
    p = plans[0]
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([str(ROOT / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node=2", "-m", "bench.plan",
                        "--breakdown-worker", d, "--steps", str(steps)], cwd=ROOT, check=True,
                       env={**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}, stdout=subprocess.DEVNULL)
        ranks = [json.loads(Path(d, f"{r}.json").read_text()) for r in range(2)]
    h = dev.action_overhead_s
    planned_each = {"F": p.F - h, "B": p.B - h, "W": p.W - h, "F&B": p.FB - h, "BW": p.B + p.W - 2 * h}
    rows = []
    for r, m in enumerate(ranks):
        counts: dict[str, int] = {}
        planned: dict[str, float] = {}
        for a in _actions("dualpipe", 2, p.layout.micro_batches)[r]:
            if a.op in ("F", "B", "W", "FB", "BW"):
                key = {"FB": "F&B"}.get(a.op, a.op)
                counts[key] = counts.get(key, 0) + 1
                # a pair whose backward half is full (DualPipe's F&BW) also computes the weight gradients, as
                # simulate() charges it
                extra = p.W - h if a.op == "FB" and a.full else 0.0
                planned[key] = planned.get(key, 0.0) + planned_each[key] + extra
        compute = sum(m.get(k, 0.0) for k in counts)
        plan_compute = sum(planned.values())
        rows.append((r, m, counts, planned, compute, plan_compute))
    lines = [f"load (1 min) {os.getloadavg()[0]:.1f}; {steps} steps, medians after the first 10; every step traced; "
             f"probe: GEMM {dev.bf16_flops / 1e9:.1f} GFLOP/s, memory {dev.hbm_bytes_s / 1e9:.1f} GB/s, "
             f"{dev.op_overhead_s * 1e6:.2f} us / operator, {dev.action_overhead_s * 1e6:.0f} us / action, "
             f"all-reduce {dev.allreduce_s * 1e6:.0f} us",
             "", "| term (seconds per step) | " + " | ".join(f"rank {r} measured | plan" for r, *_ in rows) + " |",
             "|---|" + "---|---|" * len(rows)]

    def row(name, pairs):
        lines.append(f"| {name} | " + " | ".join(f"{a:.4f} | {b:.4f}" if b is not None else f"{a:.4f} | "
                                                 for a, b in pairs) + " |")
    for k in ("F", "B", "W", "BW", "F&B"):
        if any(k in c for _, _, c, *_ in rows):
            row(f"{k} actions (x count)", [(m.get(k, 0.0), pl.get(k, 0.0)) for _, m, c, pl, *_ in rows])
    row("all actions' compute", [(comp, pc) for *_, comp, pc in rows])
    row("executor outside actions, waits (plan: per-action time, p2p, bubble)",
        [(m["executor"] - comp, p.pipeline_s - pc) for _, m, _, _, comp, pc in rows])
    row("mirror exchange + data-parallel reduce (plan: gradient exchange)",
        [(m["pipeline"] - m["executor"], p.grad_sync_s) for _, m, *_ in rows])
    row("optimizer", [(m["optimizer"], p.optimizer_s) for _, m, *_ in rows])
    row("trainer bookkeeping (the rest of the step)",
        [(m["step"] - m["pipeline"] - m["optimizer"], p.bookkeeping_s) for _, m, *_ in rows])
    row("step", [(m["step"], p.step_s) for _, m, *_ in rows])
    return "\n".join(lines)


# -- make train's pipeline parts in one process, as the executor runs them, against the planner's per-part charges --

def _timed_passes(model, forward, seeds, split: bool) -> tuple[float, float, float]:
    """(F, B, W) seconds of one chunk: forward(); backward from seeds(out) with the weight gradients deferred (B)
    and then run (W) as the executor's B and W actions do, or (split=False) one full backward (BW) in B."""
    import torch

    from framework.weight_grad import WeightGradStore, run_weight_grads

    t0 = time.perf_counter()
    out = forward()
    f = time.perf_counter() - t0
    tensors, grads = seeds(out)      # drawn outside the timing: the executor receives its gradients
    t1 = time.perf_counter()
    WeightGradStore.enabled = split
    try:
        torch.autograd.backward(tensors, grads)
    finally:
        WeightGradStore.enabled = False
    funcs = WeightGradStore.take_cache()
    t2 = time.perf_counter()
    run_weight_grads(funcs)
    return f, t2 - t1, time.perf_counter() - t2


def part_passes(reps: int = 20, tokens_small: tuple = (1, 8)) -> dict:
    """make train's two pipeline parts (framework.models + framework.parallelize's weight-gradient split +
    schedules.stage.split_model, loss scale 1/micro-batches) timed in this process, one thread: each part's F, B
    and W, its full backward, the F&BW pair DualPipe runs on both ranks (F of part 1 with the full backward of part 0,
    through the parts' overlapped_forward_backward hook, as the executor calls it), and the pieces (embedding, the
    blocks of each part, the head: norm, output head, loss, MTP) at the run's micro-batch and at `tokens_small`
    (where the fixed per-call time is nearly all). Medians over `reps` calls after 3 warm-ups, {name: seconds}."""
    import torch
    from omegaconf import OmegaConf

    from framework.models import build_model
    from framework.parallelize import split_weight_grads
    from framework.plan.run import configured_layout
    from launch.train import check_overrides
    from schedules.executor import _loss_is_output
    from schedules.stage import split_model, take_balance_losses

    torch.set_num_threads(1)
    cfg = check_overrides(["parallel=dualpipe"])
    t = cfg.train
    torch.manual_seed(0)
    model = build_model(OmegaConf.to_object(cfg.model))
    model.train()
    split_weight_grads(model)
    parts = split_model(model, 2, configured_layout(cfg).layers_per_part)
    for part in parts:
        part.loss_scale, part.overlap, part.recompute = 1.0 / t.micro_batches, cfg.parallel.overlap, False
    V, C = cfg.model.vocab_size, cfg.model.hidden_size

    def seeds(out):
        return ((out,), None) if out.dim() == 0 else ((out,), (torch.randn_like(out) * 1e-3,))

    def chunks(B, T):
        ids, labels = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))

        def h():
            return torch.randn(B, T, C, requires_grad=True)

        def blocks(layers):
            def forward():
                y = h()
                for layer in layers:
                    y = layer(y)
                take_balance_losses(layers)
                return y
            return forward
        return ids, labels, h, {"part 0": lambda: parts[0](ids), "part 1": lambda: parts[1](h(), ids, labels),
                                "embedding": lambda: model.embed_tokens(ids), "blocks of part 0": blocks(parts[0].layers),
                                "blocks of part 1": blocks(parts[1].layers),
                                "head (norm, output head, loss, MTP)": lambda: model.final(h(), ids, labels)[0]}

    micro = t.global_batch_size // t.micro_batches
    ids, labels, h, big = chunks(micro, t.seq_len)
    small = chunks(*tokens_small)[3]
    samples: dict = {}

    def add(key, value):
        samples.setdefault(key, []).append(value)

    for rep in range(reps + 3):
        model.zero_grad(set_to_none=True)
        for name, forward in big.items():
            for k, v in zip("FBW", _timed_passes(model, forward, seeds, True)):
                add((name, k), v)
            add((name, "BW"), _timed_passes(model, forward, seeds, False)[1])
            for k, v in zip("FBW", _timed_passes(model, small[name], seeds, True)):
                add((name, k + " small"), v)
        out0 = parts[0](ids)
        g0 = torch.randn_like(out0) * 1e-3
        t0 = time.perf_counter()
        _, loss = type(parts[1]).overlapped_forward_backward(parts[1], [h(), ids, labels], _loss_is_output, [],
                                                             parts[0], None, [out0], [g0])
        add(("F&BW", ""), time.perf_counter() - t0)
        loss.backward()
    return {k: statistics.median(v[3:]) for k, v in samples.items()}


def parts_table(reps: int = 20) -> str:
    """`part_passes` next to what the planner charges each part and piece, the cpu measured in this process (one
    thread, alone) with the run's linears and the model's own layers' host time."""
    import torch
    from omegaconf import OmegaConf

    from framework.plan import devices
    from framework.plan.estimate import Planner
    from framework.plan.layers import LayerCost, gemm_shapes
    from framework.plan.run import configured_layout, setting_from_config
    from launch.train import check_overrides

    cfg = check_overrides(["parallel=dualpipe"])
    t = cfg.train
    tokens = t.global_batch_size // t.micro_batches * t.seq_len
    measured = part_passes(reps)
    torch.set_num_threads(1)
    dev = devices.measure_cpu(1, runtime_bytes=0.0, shapes=gemm_shapes(cfg.model, tokens),
                              host_model=OmegaConf.to_object(cfg.model))
    plans = {"with the head's per-logit and zeroing terms": Planner(cfg.model, dev, setting_from_config(cfg)),
             "before: without them": Planner(cfg.model, replace(dev, logit_s=(), zero_s=0.0),
                                             setting_from_config(cfg))}
    lay = configured_layout(cfg)
    lines = [f"load (1 min) {os.getloadavg()[0]:.1f}; one process, one thread; {tokens} tokens per micro-batch; "
             f"medians of {reps} calls; probe: GEMM {dev.bf16_flops / 1e9:.1f} GFLOP/s, memory "
             f"{dev.hbm_bytes_s / 1e9:.1f} GB/s, {dev.op_overhead_s * 1e6:.2f} us / synthetic operator, model's "
             f"layers {' / '.join(f'{v * 1e6:.2f}' for v in dev.layer_op_s)} us / operator in F / B / W, "
             f"log-softmax and loss {' / '.join(f'{v * 1e9:.2f}' for v in dev.logit_s)} ns / logit in F / B, "
             f"zeroing {dev.zero_s * 1e12:.0f} ps / value", "",
             "| piece (ms) | F measured | plan now | plan before | B measured | plan now | plan before | W measured "
             "| plan now | plan before | full backward measured | plan now (B + W) | F, B, W at 8 tokens measured |",
             "|---|" + "---|" * 12]
    for name in ("part 0", "part 1", "embedding", "blocks of part 0", "blocks of part 1",
                 "head (norm, output head, loss, MTP)"):
        row = [name]
        costs = []
        for planner in plans.values():
            parts = planner.parts(lay.layers_per_part)
            c = {"part 0": parts[0], "part 1": parts[1], "embedding": planner.embed,
                 "blocks of part 0": sum(planner.blocks[:lay.layers_per_part[0]], LayerCost()),
                 "blocks of part 1": sum(planner.blocks[lay.layers_per_part[0]:], LayerCost()),
                 "head (norm, output head, loss, MTP)": planner.head}[name]
            costs.append(planner._compute(c, tokens, 1))
        for i, k in enumerate("FBW"):
            row += [f"{measured[(name, k)] * 1e3:.2f}", f"{costs[0][i] * 1e3:.2f}", f"{costs[1][i] * 1e3:.2f}"]
        row += [f"{measured[(name, 'BW')] * 1e3:.2f}", f"{(costs[0][1] + costs[0][2]) * 1e3:.2f}",
                " / ".join(f"{measured[(name, k + ' small')] * 1e3:.2f}" for k in "FBW")]
        lines.append("| " + " | ".join(row) + " |")
    now = plans["with the head's per-logit and zeroing terms"]
    p0, p1 = (now._compute(c, tokens, 1) for c in now.parts(lay.layers_per_part))
    lines += ["", f"F&BW pair (F of part 1 with the full backward of part 0, the parts' overlapped_forward_backward "
                  f"hook): measured {measured[('F&BW', '')] * 1e3:.2f} ms; the same pieces run apart "
                  f"{(measured[('part 1', 'F')] + measured[('part 0', 'BW')]) * 1e3:.2f} ms; plan now "
                  f"{(p1[0] + p0[1] + p0[2]) * 1e3:.2f} ms"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--skip-cpu", action="store_true", help="only the V3 section (no training run)")
    ap.add_argument("--cpu-terms", action="store_true", help="only what each measured cpu term adds to the plan")
    ap.add_argument("--breakdown", action="store_true",
                    help="only where make train's step goes, term by term, measured against the plan (60 steps)")
    ap.add_argument("--parts", action="store_true",
                    help="only make train's pipeline parts timed in one process against the planner's F, B, W")
    ap.add_argument("--breakdown-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.breakdown_worker:
        _breakdown_worker(args.steps, args.breakdown_worker)
        return
    if args.breakdown:
        print(breakdown(60 if args.steps == 300 else args.steps))
        return
    if args.parts:
        print(parts_table())
        return
    if args.cpu_terms:
        print(cpu_terms())
        return
    parts = ["## Planner (framework/plan, bench/plan.py)", "", _v3_section()]
    if not args.skip_cpu:
        parts.append(_cpu_section(args.steps))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(parts) + "\n")
    print(OUT.read_text())


if __name__ == "__main__":
    sys.exit(main())

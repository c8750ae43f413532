"""FP8 training (V3 §3.3 recipe) against the bf16 baseline on deepseek_v3_tiny: loss gap and activation memory.

  python -m bench.fp8_loss [--steps 300] [--fp32] [--workdir DIR [--reuse]]

Two single-process runs with the same data, seed and initial weights:
  fp8    fp8=blockwise: every linear and the routed experts' GEMMs in E4M3 (1x128 activation tiles, 128x128
         weight blocks, fp32 accumulation; embedding, head, router, norms and attention core stay fp32)
  bf16   train.dtype=bf16_emulated: the same GEMMs with bf16-rounded operands and fp32 accumulation
The target is V3's: loss error of FP8 relative to BF16 below 0.25% (V3 §3.3). Reported: the relative
gap of the final validation loss and of the mean training loss over the last 10% of the steps, both curves
(bench/out/fp8_loss.png), the FP8 statistics accumulated over the whole FP8 run, and the bytes the linears save for
backward on one micro-batch (framework.fp8.memory, torch.autograd.graph.saved_tensors_hooks). --fp32 adds a third
run in plain fp32: the bf16-vs-fp32 gap shows how far the loss of this small model moves when only the rounding of
the GEMM operands changes, the noise floor the FP8 gap is read against.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import OUT, compose, machine, mean_sem, train_in_process, write_report

VARIANTS = {"fp8": ["fp8=blockwise", "fp8.backend=torch"], "bf16": ["train.dtype=bf16_emulated"]}
# optional third run: how far the loss moves when only the rounding changes (bf16 vs fp32 GEMM operands), the
# noise floor against which the FP8 gap is read
FP32 = {"fp32": ["train.dtype=float32"]}
TARGET = 0.0025  # V3 §3.3: relative loss error of FP8 training vs BF16 stays below 0.25%


def rel_gap(a: float, b: float) -> float:
    """Relative gap of a (FP8) against b (BF16 baseline)."""
    return (a - b) / b


def moving_average(values: list[float], width: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def summarize_fp8(train: list[dict]) -> dict:
    """The trainer logs framework.fp8.fp8_metrics every step (counters reset per step); over the run: the largest
    amax, the mean of the per-step fractions, and the worst site of the worst step."""
    steps = [h for h in train if "fp8/sites" in h]
    if not steps:
        return {}
    out = {"fp8/sites": steps[-1]["fp8/sites"], "steps": len(steps)}
    for role in ("x", "w", "dy"):
        rs = [h for h in steps if f"fp8/{role}_amax" in h]
        if rs:
            out[f"fp8/{role}_amax"] = max(h[f"fp8/{role}_amax"] for h in rs)
            for k in ("saturated_frac", "underflow_frac"):
                out[f"fp8/{role}_{k}"] = sum(h[f"fp8/{role}_{k}"] for h in rs) / len(rs)
            out[f"fp8/{role}_underflow_frac_max"] = max(h[f"fp8/{role}_underflow_frac_max"] for h in rs)
    return out


def measure_saved_bytes(overrides: list[str]) -> dict:
    """Bytes saved for backward in one training-mode forward of one micro-batch, for each variant (fresh models
    from the same seed; which values the weights hold does not change what is saved)."""
    from omegaconf import OmegaConf

    from framework.fp8 import convert_to_bf16_emulation, convert_to_fp8, saved_tensor_bytes
    from framework.fp8.memory import ambiguous_token_counts
    from framework.models import build_model

    cfg = compose(*overrides)
    t = cfg.train
    B = t.global_batch_size // t.micro_batches
    g = torch.Generator().manual_seed(t.seed)
    ids = torch.randint(0, cfg.model.vocab_size, (B, t.seq_len + 1), generator=g)
    out = {}
    for name in VARIANTS:
        torch.manual_seed(t.seed)
        model = build_model(OmegaConf.to_object(cfg.model))
        if name == "fp8":
            convert_to_fp8(model, exclude=list(cfg.fp8.exclude), backend="torch")
        else:
            convert_to_bf16_emulation(model, exclude=list(cfg.fp8.exclude))
        if B * t.seq_len in ambiguous_token_counts(model):
            raise ValueError(f"{B * t.seq_len} tokens per micro-batch equals a linear's row count: the activation / "
                             f"weight-copy split would be ambiguous; change train.global_batch_size")
        model.train()
        out[name] = saved_tensor_bytes(model, lambda: model.compute_loss(ids[:, :-1], ids[:, 1:]))
    out["tokens"] = B * t.seq_len
    return out


def plot(runs: dict, path: Path, smooth: int) -> None:
    """Top: loss curves of the first seed's runs. Bottom: relative gaps of the smoothed training loss, every seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    colors = {"fp8": "tab:red", "bf16": "tab:blue", "fp32": "tab:grey"}
    first = next(iter(runs))
    for name, r in runs[first].items():
        color = colors.get(name, "tab:green")
        ax.plot(r["steps"], r["losses"], color=color, lw=0.5, alpha=0.35)
        ax.plot(r["steps"], moving_average(r["losses"], smooth), color=color, lw=1.3,
                label=f"{name} train ({smooth}-step mean)")
        ax.plot(r["val_steps"], r["val_losses"], "o--", color=color, ms=4, lw=0.8, label=f"{name} validation")
    ax.set_ylabel(f"loss (main + MTP), seed {first}")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    styles = ["-", "--", ":", "-."]
    for i, (seed, rs) in enumerate(runs.items()):
        smoothed = {name: moving_average(r["losses"], smooth) for name, r in rs.items()}
        steps = rs["fp8"]["steps"]
        gap.plot(steps, [100 * rel_gap(a, b) for a, b in zip(smoothed["fp8"], smoothed["bf16"])], color="k",
                 ls=styles[i % 4], lw=1, label=f"fp8 vs bf16, seed {seed}")
        gap.plot(rs["fp8"]["val_steps"], [100 * rel_gap(a, b) for a, b in zip(rs["fp8"]["val_losses"],
                                                                              rs["bf16"]["val_losses"])],
                 "o", color="k", ms=3)
        if "fp32" in smoothed:
            gap.plot(steps, [100 * rel_gap(a, b) for a, b in zip(smoothed["bf16"], smoothed["fp32"])],
                     color="tab:grey", ls=styles[i % 4], lw=1, label=f"bf16 vs fp32, seed {seed}")
    for y in (100 * TARGET, -100 * TARGET):
        gap.axhline(y, color="tab:green", lw=0.8, ls=":")
    gap.axhline(0, color="grey", lw=0.5)
    gap.set_ylabel("relative gap (%)")
    gap.set_xlabel("step (dots: validation)")
    gap.legend(fontsize=7)
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_variant(work: Path, name: str, overrides: list[str], reuse: bool) -> dict:
    """Train one variant (or reload it from `work` with reuse) and reduce its history to the figures we report."""
    saved = work / name / "history.json"
    if reuse and saved.exists():  # redo the report from finished runs
        wall, hist = json.loads(saved.read_text())
    else:
        print(f"[fp8_loss] {work.name}/{name}: metrics in {work / name}/metrics.jsonl", flush=True)
        t0 = time.perf_counter()
        trainer, hist = train_in_process(work / name, *overrides)
        wall = time.perf_counter() - t0
        del trainer
        saved.write_text(json.dumps([wall, hist]))
    train = [h for h in hist if "loss" in h]
    val = [h for h in hist if "val/loss" in h]
    tail = train[-max(1, len(train) // 10):]
    r = {"val": val[-1]["val/loss"], "tail": sum(h["loss"] for h in tail) / len(tail),
         "tail_main": sum(h["loss/main"] for h in tail) / len(tail), "first": train[0]["loss"], "wall": wall,
         "tail_steps": len(tail), "skipped": sum(h.get("skipped_steps", 0.0) for h in train)}
    print(f"[fp8_loss] {work.name}/{name}: {json.dumps(r)}", flush=True)
    r.update(steps=[h["step"] for h in train], losses=[h["loss"] for h in train],
             val_steps=[h["step"] for h in val], val_losses=[h["val/loss"] for h in val],
             fp8=summarize_fp8(train) if name == "fp8" else {})
    return r


def gaps_of(a: dict, b: dict) -> dict:
    n = a["tail_steps"]
    return {"final validation loss": rel_gap(a["val"], b["val"]),
            f"mean training loss, last {n} steps": rel_gap(a["tail"], b["tail"]),
            f"mean training loss/main, last {n} steps": rel_gap(a["tail_main"], b["tail_main"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seed of each pair of runs "
                    "(default: the config's seed only)")
    ap.add_argument("--fp32", action="store_true", help="also train in fp32, the bf16-vs-fp32 gap as noise floor")
    ap.add_argument("--workdir", default=None, help="run folders (metrics.jsonl per run); default: a temporary one")
    ap.add_argument("--reuse", action="store_true", help="reuse the runs already in --workdir (report only)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see below)")
    ap.add_argument("--control-lr", type=float, default=None, metavar="K",
                    help="also train bf16 with the peak learning rate times K: how far a change of the step size "
                         "alone moves the loss, to read the FP8 gap against")
    args = ap.parse_args()
    # on a shared, oversubscribed CPU, intra-op threads wait on preempted siblings: a step of the FP8 emulation
    # measured ~10x faster with 1 thread than with 2 under load. Every run uses the same setting.
    torch.set_num_threads(args.threads)
    if args.steps < 10:
        raise SystemExit(f"--steps={args.steps}: need at least 10 (the tail statistic uses the last 10%)")
    common = ["model=deepseek_v3_tiny", f"train.steps={args.steps}", f"train.eval_interval={max(1, args.steps // 6)}"]
    cfg = compose(*common)
    t = cfg.train
    seeds = args.seeds or [t.seed]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fp8_loss_"))
    variants = {**VARIANTS, **(FP32 if args.fp32 else {})}
    control = f"bf16 lr x{args.control_lr:g}" if args.control_lr is not None else None
    if control:
        variants[control] = [*VARIANTS["bf16"], f"optim.lr={cfg.optim.lr * args.control_lr!r}"]
    runs = {seed: {name: run_variant(work / f"seed{seed}", name.replace(" ", "_"), [*common, f"train.seed={seed}", *over],
                                     args.reuse)
                   for name, over in variants.items()} for seed in seeds}
    mem = measure_saved_bytes(common)
    plot(runs, OUT / "fp8_loss.png", smooth=max(1, args.steps // 30))

    command = (f"python -m bench.fp8_loss --steps {args.steps}" + (" --seeds " + " ".join(map(str, seeds)) if args.seeds
               else "") + (" --fp32" if args.fp32 else "") + (f" --control-lr {args.control_lr:g}" if control else ""))
    lines = [f"### FP8 vs BF16 training loss on deepseek_v3_tiny ({args.steps} steps)", "",
             f"Command: `{command}`; {machine()}. Curves: `bench/out/fp8_loss.png`.",
             f"Per seed, the runs share data, seed and initial weights; {t.global_batch_size} x {t.seq_len} tokens per "
             f"step, {cfg.optim.schedule} lr schedule (peak {cfg.optim.lr}, {cfg.optim.warmup_steps} warm-up steps). "
             "`fp8`: `fp8=blockwise` (E4M3 for Fprop, Dgrad and Wgrad of every linear and of the routed experts; "
             "1x128 activation tiles, 128x128 weight blocks, fp32 accumulation; torch emulation). `bf16`: "
             "`train.dtype=bf16_emulated` (the same GEMMs with bf16-rounded operands, fp32 accumulation)."
             + (" `fp32`: no rounding of the GEMM operands." if args.fp32 else "")
             + " Losses are the training objective (main + 0.3 MTP + balance terms).", "",
             "| run | seed | first-step loss | final val loss | mean train loss (last 10%) "
             "| train loss/main (last 10%) | skipped steps | wall time |", "|---|---|---|---|---|---|---|---|"]
    for seed, rs in runs.items():
        for name, r in rs.items():
            lines.append(f"| {name} | {seed} | {r['first']:.4f} | {r['val']:.4f} | {r['tail']:.4f} | "
                         f"{r['tail_main']:.4f} | {int(r['skipped'])} | {r['wall'] / 60:.1f} min |")
    lines += ["", "| relative gap | seed | FP8 vs BF16 | within V3's 0.25%? |"
              + (" BF16 vs FP32 (noise floor) |" if args.fp32 else ""),
              "|---|---|---|---|" + ("---|" if args.fp32 else "")]
    summary = {}
    for seed, rs in runs.items():
        gaps = gaps_of(rs["fp8"], rs["bf16"])
        floor = gaps_of(rs["bf16"], rs["fp32"]) if "fp32" in rs else {}
        summary[seed] = {"gaps": gaps, "floor": floor}
        if control:
            summary[seed]["control"] = gaps_of(rs[control], rs["bf16"])
        for k, v in gaps.items():
            lines.append(f"| {k} | {seed} | {100 * v:+.3f}% | {'yes' if abs(v) <= TARGET else 'NO'} |"
                         + (f" {100 * floor[k]:+.3f}% |" if floor else ""))
    if len(seeds) > 1:
        lines += ["", f"Mean over the {len(seeds)} seeds, +- its standard error:", "",
                  "| relative gap | FP8 vs BF16 | within V3's 0.25%? |" + (" BF16 vs FP32 (noise floor) |" if args.fp32
                                                                           else "")
                  + (f" {control} vs BF16 (step size control) |" if control else ""),
                  "|---|---|---|" + ("---|" if args.fp32 else "") + ("---|" if control else "")]
        for k in summary[seeds[0]]["gaps"]:
            m, e = mean_sem([summary[s]["gaps"][k] for s in seeds])
            row = f"| {k} | {100 * m:+.3f}% +- {100 * e:.3f}% | {'yes' if abs(m) <= TARGET else 'NO'} |"
            if args.fp32:
                fm, fe = mean_sem([summary[s]["floor"][k] for s in seeds])
                row += f" {100 * fm:+.3f}% +- {100 * fe:.3f}% |"
            if control:
                cm, ce = mean_sem([summary[s]["control"][k] for s in seeds])
                row += f" {100 * cm:+.3f}% +- {100 * ce:.3f}% |"
            lines.append(row)
    val_gaps = [summary[s]["gaps"]["final validation loss"] for s in seeds]
    m, e = mean_sem(val_gaps)
    lines += ["", f"Reading: FP8 ends {100 * m:+.3f}%" + (f" +- {100 * e:.3f}%" if len(seeds) > 1 else "")
              + f" from BF16 in final validation loss over {len(seeds)} seed(s) ("
              + ("within" if abs(m) <= TARGET else "outside") + " V3's 0.25%); single seeds range from "
              f"{100 * min(val_gaps):+.3f}% to {100 * max(val_gaps):+.3f}%, the run-to-run scatter of a model this "
              "small." + (f" A {100 * (args.control_lr - 1):+.0f}% learning rate moves BF16 by "
                          f"{100 * mean_sem([summary[s]['control']['final validation loss'] for s in seeds])[0]:+.3f}%."
                          if control else "")]
    fp8_stats = runs[seeds[0]]["fp8"]["fp8"]
    if fp8_stats:
        lines += ["", f"FP8 statistics of the FP8 run (seed {seeds[0]}), logged every step by the trainer "
                  f"(`framework.fp8.fp8_metrics`, {int(fp8_stats['fp8/sites'])} FP8 GEMM sites) and summarized over "
                  f"its {fp8_stats['steps']} steps: largest amax, mean of the per-step fractions, worst site of the "
                  "worst step. Roles: x = GEMM inputs, w = weights, dy = output gradients.", "",
                  "| role | amax | saturated fraction | underflow fraction (all sites) "
                  "| underflow fraction (worst site, worst step) |", "|---|---|---|---|---|"]
        for role in ("x", "w", "dy"):
            if f"fp8/{role}_amax" in fp8_stats:
                lines.append(f"| {role} | {fp8_stats[f'fp8/{role}_amax']:.3g} | "
                             f"{fp8_stats[f'fp8/{role}_saturated_frac']:.3g} | "
                             f"{fp8_stats[f'fp8/{role}_underflow_frac']:.3g} | "
                             f"{fp8_stats[f'fp8/{role}_underflow_frac_max']:.3g} |")
    m8, mb = mem["fp8"], mem["bf16"]
    mib = 1 / 2**20
    lines += ["", f"Bytes saved for backward in one training forward of one micro-batch ({mem['tokens']} tokens), "
              "counted with `torch.autograd.graph.saved_tensors_hooks` (`framework.fp8.memory.saved_tensor_bytes`). "
              "Each linear counts its own copy of its input (linears sharing an input count it twice, in both runs); "
              "the whole forward counts unique storages, parameters excluded:", "",
              "| saved for backward | fp8 (MiB) | bf16 (MiB) | fp8 / bf16 |", "|---|---|---|---|"]
    for label, a, b in (("linear inputs (activations)", m8.activations, mb.activations),
                        ("weight copies (FP8 + block scales / bf16)", m8.weight_copies, mb.weight_copies),
                        ("whole forward (everything autograd saved)", m8.model_total, mb.model_total)):
        lines.append(f"| {label} | {a * mib:.2f} | {b * mib:.2f} | {a / b:.3f} |")
    lines += ["", f"GEMM calls counted: fp8 {m8.sites}, bf16 {mb.sites}."]
    write_report("fp8_loss", "\n".join(lines))
    (work / "summary.json").write_text(json.dumps({
        "runs": {seed: {n: {k: v for k, v in r.items() if k not in ("steps", "losses")} for n, r in rs.items()}
                 for seed, rs in runs.items()},
        "gaps": summary, "memory": {k: vars(v) for k, v in mem.items() if k != "tokens"}}, indent=1))


if __name__ == "__main__":
    main()

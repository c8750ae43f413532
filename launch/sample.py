"""Sample a checkpoint's completions into a JSONL file: the data of distillation (R1 §2.4) and rejection sampling.

  python -m launch.sample --checkpoint outputs/<run>/checkpoints/step_00000360 --out teacher.jsonl \
      [--prompts prompts.jsonl | --problems 2000] [--samples 4] [--temperature 0.7] [--only-correct]
  python -m launch.rl rl.sft_data=teacher.jsonl rl.grpo_steps=0 ...      # the student learns from it

Prompts come from a JSONL file ({prompt[, answer]} per line, or {messages[, answer]} chats ending with a user turn),
or are drawn from
the training part of the embedded task (the checkpoint's task settings). Every output line is
{prompt, completion, finished, reward, accuracy, format}; accuracy is scored against the answer when the prompt has one
(0 otherwise). --only-correct keeps the completions whose answer is right (rejection sampling, R1 §2.3.3).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def read_prompts(path: str) -> list[tuple[str, str]]:
    """(prompt, answer or "") per line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts={path!r}: no such file")
    from framework.data.sources import jsonl_rows

    out = []
    for n, row in jsonl_rows(p):
        row = row if isinstance(row, dict) else {}
        answer = str(row.get("answer", ""))
        if isinstance(row.get("prompt"), str):
            out.append((row["prompt"], answer))
        elif isinstance(row.get("messages"), list):
            msgs = row["messages"]
            out.append(("".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: ", answer))
        else:
            raise ValueError(f"{p}:{n}: expected a 'prompt' string or a 'messages' list, got keys {sorted(row)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.sample", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a launch.rl checkpoint folder (checkpoints/step_*)")
    ap.add_argument("--out", required=True, help="JSONL file to write")
    ap.add_argument("--prompts", default=None, help="JSONL of {prompt}; default: problems of the embedded task")
    ap.add_argument("--problems", type=int, default=1000, help="task problems to draw when --prompts is not given")
    ap.add_argument("--samples", type=int, default=1, help="completions per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's rl.max_new_tokens")
    ap.add_argument("--only-correct", action="store_true", help="keep completions with accuracy reward 1")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for name, v, ok in (("--samples", a.samples, a.samples >= 1), ("--problems", a.problems, a.problems >= 1),
                        ("--temperature", a.temperature, a.temperature >= 0), ("--top-p", a.top_p, 0 < a.top_p <= 1)):
        if not ok:
            print(f"error: {name}={v}: out of range", file=sys.stderr)
            return 2

    import torch

    from framework.checkpoint import CheckpointError
    from framework.rl.config import RLConfig
    from framework.rl.rewards import RewardSet, Scored
    from framework.rl.sampling import sample
    from framework.rl.task import ArithmeticTask, Problem, build_tokenizer
    from launch.rl import load_policy

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        model, _, meta = load_policy(a.checkpoint)
        rl_dict = meta.get("config", {}).get("rl", {})
        rl = RLConfig(**{k: v for k, v in rl_dict.items() if k in RLConfig.__dataclass_fields__})
        tok = build_tokenizer(meta.get("tokenizer", "char"))
        if a.prompts:
            problems = [Problem(p, ans) for p, ans in read_prompts(a.prompts)]
        else:
            problems = ArithmeticTask.from_config(rl).problems(a.problems, seed=a.seed, heldout=False)
        prompts = [tok.encode_prompt(p.prompt) for p in problems]
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(a.seed)
    smp = sample(model, prompts, a.samples, a.max_new_tokens or rl.max_new_tokens, a.temperature, a.top_p,
                 tok.eos_id, list(rl.stop), tok.decode, gen, rl.sample_batch)
    texts = [tok.decode(c) for c in smp.completion_ids]
    scored = [Scored(t, problems[i], len(c), f) for i, t, c, f in zip(smp.prompt_index, texts, smp.completion_ids,
                                                                       smp.finished)]
    _, parts, _ = RewardSet({"accuracy": 1.0, "format": 1.0}).score(scored)
    kept = 0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for s, acc, fmt in zip(scored, parts["accuracy"].tolist(), parts["format"].tolist()):
            if a.only_correct and (acc < 1 or not s.problem.answer):
                continue
            f.write(json.dumps({"prompt": s.problem.prompt, "completion": s.completion, "finished": s.finished,
                                "reward": acc + fmt, "accuracy": acc, "format": fmt}) + "\n")
            kept += 1
    print(f"wrote {kept} of {len(scored)} completions to {out} ({smp.stats['tokens_per_s']:.0f} tokens/s; "
          f"accuracy {parts['accuracy'].mean().item():.3f}, format {parts['format'].mean().item():.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

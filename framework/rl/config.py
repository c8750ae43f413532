"""Settings of post-training (SFT and GRPO), the `rl` group of the schema.

`python -m launch.rl` runs the stages in order: SFT (rl.sft_steps > 0), evaluation, GRPO (rl.grpo_steps > 0),
evaluation. The SFT data is the embedded arithmetic task's format data (rl.sft_data=null) or a JSONL file; the GRPO
prompts and rewards come from the embedded task. Model size, optimizer betas / weight decay / grad clip, seed, device
and logging come from the other groups (model, optim, train, logging).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RLConfig:
    # --- where to start, where the data comes from ---
    init: Optional[str] = None             # checkpoint folder to start from (a launch.rl step_* folder); null = fresh
    tokenizer: str = "char"                # char: printable ASCII + <s> <eos> <think> </think> <answer> </answer>
                                           # (the model's vocabulary is the tokenizer's; model.vocab_size is unused),
                                           # or a Hugging Face tokenizer folder: prompts go through its chat template
    sft_data: Optional[str] = None         # JSONL of {prompt, completion} or {messages: [...]}; null = the task's
    # --- the embedded task: integer arithmetic with a checkable answer ---
    task_min_digits: int = 1               # operand length range (digits)
    task_max_digits: int = 3
    task_ops: str = "+"                    # operators drawn from: any of "+-" (subtraction keeps the result >= 0)
    task_heldout_mod: int = 10             # problems (a, op, b) with crc32 % mod == 0 are for evaluation only
    sft_examples: int = 20000              # distinct task examples in the SFT set
    sft_reason_fraction: float = 0.3       # share of SFT completions that work digit by digit inside <think>
    sft_bad_format_fraction: float = 0.1   # share with a broken format (no <think>, or no tags at all)
    sft_wrong_fraction: float = 0.0        # share whose final answer is corrupted (label noise)
    # --- SFT / distillation ---
    sft_steps: int = 1000                  # optimizer steps of SFT; 0 = skip
    sft_batch_size: int = 32               # sequences per SFT step, all data-parallel ranks together
    sft_seq_len: int = 128                 # packed sequence length
    sft_pack: bool = True                  # pack several examples per sequence (they can attend to earlier ones)
    sft_lr: float = 3e-3                   # peak lr of SFT (optim.schedule, optim.warmup_steps, optim.min_lr_ratio)
    # --- GRPO (DeepSeekMath §4.1; R1 §2.2) ---
    grpo_steps: int = 40                   # sampling rounds; 0 = skip
    prompts_per_step: int = 32             # prompts per round, all ranks together (sharded by prompt)
    group_size: int = 8                    # G: samples per prompt (DeepSeekMath 64, R1 16)
    updates_per_batch: int = 2             # optimizer steps on each batch of samples (mu; old log-probs kept)
    beta: float = 0.04                     # KL weight (DeepSeekMath 0.04, R1 0.001)
    clip_eps: float = 0.2                  # ratio clipping epsilon
    lr: float = 1e-4                       # GRPO learning rate (constant after rl.warmup_steps)
    warmup_steps: int = 5                  # GRPO lr warmup (optimizer steps)
    ref_refresh_steps: int = 0             # copy the policy into the reference every N rounds (R1: 400); 0 = never
    std_floor: float = 1e-4                # advantages divide by max(std, floor); groups whose rewards are all equal
                                           # are skipped (and counted: grpo/groups/skipped)
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
                                           # name -> weight; change one with rl.rewards.format=0, add one with
                                           # +rl.rewards.length=0.2 (built-in: accuracy, format, length, language)
    length_target: int = 64                # length reward: 0 up to this many completion tokens, then down to -1
    language_alphabet: str = "0123456789+-=, "  # language reward: share of <think> characters drawn from this set
    # --- sampling ---
    temperature: float = 1.0               # GRPO sampling temperature
    top_p: float = 1.0                     # nucleus sampling mass
    max_new_tokens: int = 48               # completion length cap
    stop: list[str] = field(default_factory=lambda: ["</answer>"])  # stop strings (end of sequence always stops)
    sample_batch: int = 512                # rows decoded together (bounds memory)
    # --- evaluation ---
    eval_problems: int = 400               # held-out problems scored before and after GRPO
    eval_temperature: float = 0.0          # 0 = greedy; the sampled accuracy (temperature 1) is reported as well


TOKENIZERS = ("char",)
REWARD_NAMES = ("accuracy", "format", "length", "language")  # built-in plug-ins; rewards.register adds more


def validate_rl(rl: RLConfig) -> None:
    from framework.config import _choice, _fail, _fraction, _positive

    if rl.tokenizer not in TOKENIZERS:
        from pathlib import Path

        if not Path(rl.tokenizer).exists():
            _fail("rl.tokenizer", rl.tokenizer, f"allowed: {', '.join(TOKENIZERS)} or a Hugging Face tokenizer folder "
                  f"(no such folder or file)")
        if Path(rl.tokenizer).is_dir() and not (Path(rl.tokenizer) / "tokenizer.json").is_file():
            _fail("rl.tokenizer", rl.tokenizer, "the folder has no tokenizer.json")
    for k in ("task_min_digits", "task_max_digits", "task_heldout_mod", "sft_examples", "sft_batch_size",
              "sft_seq_len", "sft_lr", "prompts_per_step", "group_size", "updates_per_batch", "clip_eps", "lr",
              "std_floor", "length_target", "max_new_tokens", "sample_batch", "eval_problems"):
        _positive(f"rl.{k}", getattr(rl, k))
    for k in ("sft_steps", "grpo_steps", "beta", "warmup_steps", "ref_refresh_steps", "temperature",
              "eval_temperature"):
        _positive(f"rl.{k}", getattr(rl, k), zero_ok=True)
    if rl.task_min_digits > rl.task_max_digits:
        _fail("rl.task_min_digits", rl.task_min_digits, f"must be <= rl.task_max_digits={rl.task_max_digits}")
    if rl.task_max_digits > 18:
        _fail("rl.task_max_digits", rl.task_max_digits, "must be <= 18")
    if not rl.task_ops or any(c not in "+-" for c in rl.task_ops):
        _fail("rl.task_ops", rl.task_ops, "a non-empty string of the operators + and -")
    if rl.task_heldout_mod < 2:
        _fail("rl.task_heldout_mod", rl.task_heldout_mod, "must be >= 2 (1 would hold out every problem)")
    for k in ("sft_reason_fraction", "sft_bad_format_fraction", "sft_wrong_fraction"):
        _fraction(f"rl.{k}", getattr(rl, k))
    if rl.sft_reason_fraction + rl.sft_bad_format_fraction > 1:
        _fail("rl.sft_bad_format_fraction", rl.sft_bad_format_fraction,
              f"rl.sft_reason_fraction + rl.sft_bad_format_fraction must be <= 1 (reason={rl.sft_reason_fraction})")
    if rl.group_size < 2:
        _fail("rl.group_size", rl.group_size, "must be >= 2 (advantages compare samples within a group)")
    if not 0 < rl.top_p <= 1:
        _fail("rl.top_p", rl.top_p, "must be in (0, 1]")
    if not rl.rewards:
        _fail("rl.rewards", dict(rl.rewards),
              f"at least one reward, e.g. {{accuracy: 1.0}}; built-in: {', '.join(REWARD_NAMES)}")
    from framework.rl.rewards import REGISTRY

    for name, weight in rl.rewards.items():
        if name not in REGISTRY:
            _fail(f"rl.rewards.{name}", weight, f"unknown reward; registered: {', '.join(sorted(REGISTRY))}")
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            _fail(f"rl.rewards.{name}", weight, "weight must be a finite number")
    if any(not s for s in rl.stop):
        _fail("rl.stop", list(rl.stop), "stop strings must be non-empty")


def validate_rl_run(rl: RLConfig, model_cfg, parallel_cfg, world_size: int) -> None:
    """Checks that need the whole configuration and the world size (launch.rl calls it before any process group)."""
    from framework.config import _fail

    validate_rl(rl)
    if parallel_cfg.pp != 1:
        _fail("parallel.pp", parallel_cfg.pp, "post-training runs data parallel only: set parallel.pp=1")
    if parallel_cfg.ep != 1:
        _fail("parallel.ep", parallel_cfg.ep, "post-training keeps every expert on every rank: set parallel.ep=1")
    if rl.prompts_per_step % world_size:
        _fail("rl.prompts_per_step", rl.prompts_per_step, f"must be a multiple of the world size {world_size}")
    if rl.sft_batch_size % world_size:
        _fail("rl.sft_batch_size", rl.sft_batch_size, f"must be a multiple of the world size {world_size}")
    if rl.sft_seq_len > model_cfg.max_position_embeddings:
        _fail("rl.sft_seq_len", rl.sft_seq_len,
              f"must be <= model.max_position_embeddings={model_cfg.max_position_embeddings}")

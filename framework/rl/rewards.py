"""Rule-based rewards as plug-ins (R1 §2.2.2: R1-Zero is trained on accuracy + format rules only, no reward model).

A reward is a function (sample: Scored, options: dict) -> float, registered by name:

    @register("my_reward")
    def my_reward(sample, options): ...

rl.rewards maps names to weights; the total reward of a sample is the weighted sum. A reward that raises counts as
0 for that sample and is counted (metric reward/errors/<name>), with its first message printed once: a buggy checker
never stops a run.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from framework.rl.task import ANSWER, END_ANSWER, END_THINK, THINK, Problem

RewardFn = Callable[["Scored", dict], float]
REGISTRY: dict[str, RewardFn] = {}


@dataclass
class Scored:
    """What a reward sees: the completion text (format tags included), its problem and its length in tokens."""
    completion: str
    problem: Problem
    num_tokens: int
    finished: bool = True                 # False when it hit rl.max_new_tokens before a stop


def register(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        REGISTRY[name] = fn
        return fn
    return deco


_NO_TAG = "((?:(?!" + "|".join(re.escape(t) for t in (THINK, END_THINK, ANSWER, END_ANSWER)) + ").)*)"  # tag-free text
_FORMAT = re.compile(re.escape(THINK) + _NO_TAG + re.escape(END_THINK) + r"\s*" + re.escape(ANSWER) + _NO_TAG
                     + re.escape(END_ANSWER), re.DOTALL)
_ANSWER = re.compile(re.escape(ANSWER) + r"(.*?)" + re.escape(END_ANSWER), re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """Content of the last <answer>...</answer>, stripped; None when there is none."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


@register("accuracy")
def accuracy(sample: Scored, options: dict) -> float:
    """1 if the extracted answer is right: the problem's checker decides when it has one, else exact match."""
    got = extract_answer(sample.completion)
    if got is None:
        return 0.0
    if sample.problem.checker is not None:
        return float(bool(sample.problem.checker(got)))
    want = sample.problem.answer.strip()
    return float(bool(want) and got == want)  # a problem without an answer is never "right"


@register("format")
def format_reward(sample: Scored, options: dict) -> float:
    """1 if the whole completion is exactly <think>...</think><answer>...</answer>, each block free of other tags
    (R1's format reward)."""
    return float(_FORMAT.fullmatch(sample.completion.strip()) is not None)


@register("length")
def length_reward(sample: Scored, options: dict) -> float:
    """0 up to `length_target` tokens, then falls linearly to -1 at twice that (a soft length budget)."""
    target = options.get("length_target", 64)
    over = max(0, sample.num_tokens - target)
    return -min(1.0, over / target)


@register("language")
def language_reward(sample: Scored, options: dict) -> float:
    """Share of the reasoning's characters drawn from `language_alphabet` (R1 §2.3.2's language-consistency
    reward is the share of target-language words in the chain of thought); 0 when there is no reasoning block."""
    m = _FORMAT.fullmatch(sample.completion.strip())
    if m is None or not m.group(1):
        return 0.0
    alphabet = set(options.get("language_alphabet", ""))
    text = m.group(1)
    return sum(c in alphabet for c in text) / len(text)


class RewardSet:
    """Weighted sum of registered rewards; errors contained and counted."""

    def __init__(self, weights: dict[str, float], options: dict | None = None):
        unknown = [n for n in weights if n not in REGISTRY]
        if unknown:
            raise ValueError(f"rl.rewards.{unknown[0]}: unknown reward; registered: {', '.join(sorted(REGISTRY))}")
        self.weights = {n: float(w) for n, w in weights.items()}
        self.options = dict(options or {})
        self.errors = {n: 0 for n in self.weights}       # since construction
        self._reported: set[str] = set()

    def score(self, samples: list[Scored]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, int]]:
        """-> total [N] (float64), each reward's values [N], and the error count of this call per reward."""
        parts, errors = {}, {}
        for name in self.weights:
            fn, vals, errs = REGISTRY[name], [], 0
            for s in samples:
                try:
                    v = float(fn(s, self.options))
                    if v != v:
                        raise ValueError("returned NaN")
                except Exception as e:  # a faulty reward scores 0 for this sample; the run goes on
                    v, errs = 0.0, errs + 1
                    if name not in self._reported:
                        self._reported.add(name)
                        print(f"reward {name!r} raised {type(e).__name__}: {e} (counted as 0; reported once)",
                              file=sys.stderr, flush=True)
                vals.append(v)
            parts[name] = torch.tensor(vals, dtype=torch.float64)
            errors[name] = errs
            self.errors[name] += errs
        total = torch.zeros(len(samples), dtype=torch.float64)
        for name, w in self.weights.items():
            total += w * parts[name]
        return total, parts, errors


def from_config(rl) -> RewardSet:
    return RewardSet(dict(rl.rewards), {"length_target": rl.length_target, "language_alphabet": rl.language_alphabet})

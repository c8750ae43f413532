"""The embedded verifiable task (integer arithmetic with a known answer), its tokenizer, and SFT data files.

Tokenizer: character level. Printable ASCII and newline are one token each, plus seven special tokens: <pad>, <s>
(start of every example, so packed examples have a visible boundary), <eos>, and the four R1 format tags
<think> </think> <answer> </answer>. A tag is one token, so the format costs the model 4 decisions, not 30 letters,
and arithmetic digits are never merged the way a BPE would merge them (which makes column-wise reasoning hard to
learn for a tiny model). Any ASCII JSONL can be fine-tuned with it; other characters are refused by name.

Problem: "a+b=" or "a-b=" (a >= b) with operands of task_min_digits..task_max_digits digits. The answer is the
decimal result. A fixed hash of (a, op, b) holds out 1/task_heldout_mod of all problems: training draws only from the
rest and evaluation only from the held-out part, so evaluation problems are never seen in SFT or GRPO.

SFT completions come in three styles, mixed by rl.sft_reason_fraction / rl.sft_bad_format_fraction (R1-Zero's
starting point is a policy that sometimes reasons and sometimes does not; RL has to discover which pays):
  reason  <think>7+9=16,4+8+1=13,3+5+1=9</think><answer>936</answer>   columns from the right, with carries
  direct  <think></think><answer>936</answer>                            the answer with no work shown
  broken  <answer>936</answer>  or  936                                  no reasoning block (format reward 0)
"""
from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

PAD, BOS, EOS = "<pad>", "<s>", "<eos>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIALS = (PAD, BOS, EOS, THINK, END_THINK, ANSWER, END_ANSWER)


class CharTokenizer:
    """Characters of printable ASCII (and '\\n') plus SPECIALS; the tags are matched greedily while encoding."""

    def __init__(self):
        chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.itos: list[str] = list(SPECIALS) + chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = self.stoi[PAD], self.stoi[BOS], self.stoi[EOS]
        self._tags = sorted((s for s in SPECIALS), key=len, reverse=True)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text[i] == "<":
                tag = next((t for t in self._tags if text.startswith(t, i)), None)
                if tag is not None:
                    ids.append(self.stoi[tag])
                    i += len(tag)
                    continue
            c = text[i]
            if c not in self.stoi:
                raise ValueError(f"character {c!r} at offset {i} is not in the char tokenizer's alphabet "
                                 f"(printable ASCII and newline)")
            ids.append(self.stoi[c])
            i += 1
        return ids

    def encode_prompt(self, text: str, messages: Optional[list[dict]] = None) -> list[int]:
        """<s> prompt: the start of every example and of every sampled completion (`messages` has no use here:
        chats arrive already rendered as text)."""
        return [self.bos_id] + self.encode(text)

    def decode(self, ids, keep_special: bool = False) -> str:
        """Text of ids; <pad>, <s> and <eos> are dropped unless keep_special (the format tags are always kept)."""
        drop = () if keep_special else (self.pad_id, self.bos_id, self.eos_id)
        return "".join(self.itos[i] for i in ids if i not in drop)


def build_tokenizer(name: str):
    """The char tokenizer, or a Hugging Face tokenizer folder (framework.data.hf_tokenizer: its chat template frames
    the prompts, its EOS ends the completions)."""
    if name == "char":
        return CharTokenizer()
    from framework.data.hf_tokenizer import load_tokenizer
    return load_tokenizer(name, key="rl.tokenizer")


# ---------------------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Problem:
    prompt: str                           # text after <s>: "347+589="
    answer: str                           # "936"
    a: int = 0
    b: int = 0
    op: str = "+"
    checker: Optional[Callable[[str], bool]] = None  # optional: decides correctness of an extracted answer instead
                                                     # of the exact match with `answer`

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer}


def _digits(n: int, width: int) -> list[int]:
    """Decimal digits of n from the least significant, padded with zeros to width."""
    return [(n // 10**i) % 10 for i in range(width)]


def reasoning_trace(a: int, op: str, b: int) -> str:
    """Column-by-column work from the right. Addition: "7+9=16,4+8+1=13" (carry added when present).
    Subtraction: "17-9=8,14-8-1=5" (a borrowed 10 written in front of the top digit, the borrow subtracted)."""
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    cols, carry = [], 0
    for x, y in zip(da, db):
        if op == "+":
            s = x + y + carry
            cols.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
            carry = s // 10
        else:
            d = x - y - carry
            top = x + 10 if d < 0 else x
            cols.append(f"{top}-{y}" + (f"-{carry}" if carry else "") + f"={top - y - carry}")
            carry = 1 if d < 0 else 0
    return ",".join(cols)


class ArithmeticTask:
    def __init__(self, min_digits: int = 1, max_digits: int = 3, ops: str = "+", heldout_mod: int = 10):
        if min_digits < 1 or max_digits < min_digits:
            raise ValueError(f"rl.task_min_digits={min_digits}, rl.task_max_digits={max_digits}: need 1 <= min <= max")
        if not ops or any(c not in "+-" for c in ops):
            raise ValueError(f"rl.task_ops={ops!r}: a non-empty string of + and -")
        self.min_digits, self.max_digits, self.ops, self.heldout_mod = min_digits, max_digits, ops, heldout_mod

    @classmethod
    def from_config(cls, rl) -> "ArithmeticTask":
        return cls(rl.task_min_digits, rl.task_max_digits, rl.task_ops, rl.task_heldout_mod)

    def is_heldout(self, a: int, op: str, b: int) -> bool:
        return zlib.crc32(f"{a}{op}{b}".encode()) % self.heldout_mod == 0

    def _operand(self, rng: random.Random) -> int:
        n = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)

    def problem(self, rng: random.Random, heldout: bool) -> Problem:
        """One problem from the training part (heldout=False) or the held-out part."""
        while True:
            a, b, op = self._operand(rng), self._operand(rng), rng.choice(self.ops)
            if op == "-" and a < b:
                a, b = b, a
            if self.is_heldout(a, op, b) == heldout:
                return Problem(f"{a}{op}{b}=", str(a + b if op == "+" else a - b), a, b, op)

    def problems(self, n: int, seed: int, heldout: bool) -> list[Problem]:
        rng = random.Random(seed)
        return [self.problem(rng, heldout) for _ in range(n)]

    def completion(self, p: Problem, style: str, rng: random.Random, wrong: bool = False) -> str:
        answer = p.answer
        if wrong:  # label noise: one digit of the answer changed
            i = rng.randrange(len(answer))
            lowest = 1 if i == 0 and len(answer) > 1 else 0                   # no leading zero
            answer = answer[:i] + rng.choice([d for d in "0123456789"[lowest:] if d != answer[i]]) + answer[i + 1:]
        if style == "reason":
            return f"{THINK}{reasoning_trace(p.a, p.op, p.b)}{END_THINK}{ANSWER}{answer}{END_ANSWER}"
        if style == "direct":
            return f"{THINK}{END_THINK}{ANSWER}{answer}{END_ANSWER}"
        if style == "broken":
            return f"{ANSWER}{answer}{END_ANSWER}" if rng.random() < 0.5 else answer
        raise ValueError(f"style={style!r}: allowed: reason, direct, broken")

    def sft_examples(self, n: int, seed: int, reason_fraction: float, bad_format_fraction: float,
                     wrong_fraction: float = 0.0) -> list[dict]:
        """n {prompt, completion} pairs from the training part, styles mixed by the given fractions."""
        rng = random.Random(seed)
        out = []
        for p in self.problems(n, seed + 1, heldout=False):
            u = rng.random()
            if u < reason_fraction:
                style = "reason"
            elif u < reason_fraction + bad_format_fraction:
                style = "broken"
            else:
                style = "direct"
            wrong = rng.random() < wrong_fraction
            out.append({"prompt": p.prompt, "completion": self.completion(p, style, rng, wrong)})
        return out


# ---------------------------------------------------------------------------------------------------------------------
# SFT data files
# ---------------------------------------------------------------------------------------------------------------------

def chat_to_pair(messages: list[dict], where: str) -> dict:
    """{messages: [{role, content}, ...]} -> {prompt, completion}: the last assistant turn is the completion, every
    earlier turn is rendered as "role: content\\n" into the prompt (loss only on the answer, as in R1's SFT)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: every message needs 'role' and 'content', got {m!r}")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's, got role={messages[-1]['role']!r}")
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
    # the turns travel along: a tokenizer with a chat template renders them itself
    return {"prompt": prompt, "completion": messages[-1]["content"], "messages": messages[:-1]}


def load_jsonl(path: str | Path, limit: Optional[int] = None) -> list[dict]:
    """{prompt, completion} pairs from a JSONL file of such pairs or of {messages: [...]} chats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rl.sft_data={str(path)!r}: no such file")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if "messages" in row:
                out.append(chat_to_pair(row["messages"], where))
            elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
                out.append({"prompt": row["prompt"], "completion": row["completion"]})
            else:
                raise ValueError(f"{where}: expected {{prompt, completion}} strings or {{messages: [...]}}, "
                                 f"got keys {sorted(row)}")
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"rl.sft_data={str(path)!r}: the file holds no examples")
    return out

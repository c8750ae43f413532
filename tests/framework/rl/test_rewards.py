"""Rule-based rewards: exact values of the built-in plug-ins, checker callables, the weighted sum, and containment
of a plug-in that raises (scored 0, counted, the run goes on)."""
from __future__ import annotations

import pytest
import torch

from framework.rl.rewards import REGISTRY, RewardSet, Scored, extract_answer, register
from framework.rl.task import ArithmeticTask, Problem, reasoning_trace


def s(text: str, answer: str = "936", n: int | None = None, checker=None) -> Scored:
    return Scored(text, Problem("347+589=", answer, checker=checker), len(text) if n is None else n)


def test_accuracy_and_format_values():
    good = "<think>7+9=16,4+8+1=13,3+5+1=9</think><answer>936</answer>"
    cases = [  # text, accuracy, format
        (good, 1.0, 1.0),
        ("<think></think><answer>936</answer>", 1.0, 1.0),            # empty reasoning is still the format
        ("<think>x</think><answer> 936 </answer>", 1.0, 1.0),         # answers are stripped
        ("<think>x</think><answer>935</answer>", 0.0, 1.0),
        ("<answer>936</answer>", 1.0, 0.0),                            # right, but no reasoning block
        ("936", 0.0, 0.0),                                             # no answer tags: nothing to check
        ("<think>x</think><answer>936</answer> trailing", 1.0, 0.0),
        ("<think>x<answer>936</answer>", 1.0, 0.0),                    # unclosed think
        ("<think>a</think><answer>1</answer><answer>936</answer>", 1.0, 0.0),  # the last answer counts
    ]
    rs = RewardSet({"accuracy": 1.0, "format": 1.0})
    total, parts, errors = rs.score([s(t) for t, _, _ in cases])
    assert parts["accuracy"].tolist() == [c[1] for c in cases]
    assert parts["format"].tolist() == [c[2] for c in cases]
    assert total.tolist() == [c[1] + c[2] for c in cases] and errors == {"accuracy": 0, "format": 0}
    assert extract_answer("no tags") is None
    # a problem without an answer is never right (sampling arbitrary prompts)
    assert RewardSet({"accuracy": 1.0}).score([s("<answer></answer>", answer="")])[0].tolist() == [0.0]


def test_checker_callable_decides_correctness():
    even = s("<think></think><answer>42</answer>", answer="", checker=lambda a: int(a) % 2 == 0)
    odd = s("<think></think><answer>41</answer>", answer="", checker=lambda a: int(a) % 2 == 0)
    _, parts, _ = RewardSet({"accuracy": 1.0}).score([even, odd])
    assert parts["accuracy"].tolist() == [1.0, 0.0]


def test_length_and_language_and_weights():
    rs = RewardSet({"length": 2.0, "language": 0.5, "format": 1.0},
                   {"length_target": 10, "language_alphabet": "0123456789+=,"})
    samples = [s("<think>1+2=3</think><answer>3</answer>", n=8),       # under the target: 0
               s("<think>1+2=3 ok</think><answer>3</answer>", n=15),   # 5 over 10: -0.5; language 5/8
               s("<think></think><answer>3</answer>", n=40),           # capped at -1; no reasoning: language 0
               s("3", n=1)]                                           # no format: language 0
    total, parts, _ = rs.score(samples)
    assert parts["length"].tolist() == [0.0, -0.5, -1.0, 0.0]
    assert parts["language"].tolist() == pytest.approx([1.0, 5 / 8, 0.0, 0.0])
    want = [2 * l + 0.5 * g + f for l, g, f in zip(parts["length"], parts["language"], parts["format"])]
    assert total.tolist() == pytest.approx([float(w) for w in want])
    assert total.dtype == torch.float64


def test_a_reward_that_raises_scores_zero_and_is_counted(capsys):
    @register("explodes_on_seven")
    def explodes(sample, options):
        if "7" in sample.completion:
            raise RuntimeError("checker crashed")
        return 1.0

    @register("nan_reward")
    def nan_reward(sample, options):
        return float("nan")

    try:
        rs = RewardSet({"explodes_on_seven": 1.0, "nan_reward": 1.0, "accuracy": 1.0})
        texts = ["<think></think><answer>936</answer>", "<think>7</think><answer>936</answer>", "7", "ok"]
        total, parts, errors = rs.score([s(t) for t in texts])
        assert parts["explodes_on_seven"].tolist() == [1.0, 0.0, 0.0, 1.0]
        assert parts["nan_reward"].tolist() == [0.0] * 4                 # NaN would poison the advantages
        assert errors == {"explodes_on_seven": 2, "nan_reward": 4, "accuracy": 0}
        assert total.tolist() == [2.0, 1.0, 0.0, 1.0]
        rs.score([s("7")])
        assert rs.errors["explodes_on_seven"] == 3                         # running count
        err = capsys.readouterr().err
        assert err.count("explodes_on_seven") == 1 and "checker crashed" in err   # reported once
    finally:
        REGISTRY.pop("explodes_on_seven")
        REGISTRY.pop("nan_reward")


def test_unknown_reward_is_named():
    with pytest.raises(ValueError, match=r"^rl\.rewards\.nope: unknown reward"):
        RewardSet({"nope": 1.0})


def test_task_answers_and_traces_are_right():
    """Every trace's columns, read as the algorithm says, give the answer the rewards check against."""
    task = ArithmeticTask(1, 4, "+-", heldout_mod=5)
    train = task.problems(300, seed=0, heldout=False)
    held = task.problems(100, seed=0, heldout=True)
    assert not {(p.a, p.op, p.b) for p in train} & {(p.a, p.op, p.b) for p in held}
    assert all(task.is_heldout(p.a, p.op, p.b) for p in held)
    for p in train + held:
        assert int(p.answer) == (p.a + p.b if p.op == "+" else p.a - p.b) and int(p.answer) >= 0
        digits = [int(col.split("=")[1]) % 10 for col in reasoning_trace(p.a, p.op, p.b).split(",")]
        last = int(reasoning_trace(p.a, p.op, p.b).split(",")[-1].split("=")[1])
        value = sum(d * 10**i for i, d in enumerate(digits)) + (10 ** len(digits) if p.op == "+" and last >= 10 else 0)
        assert value == int(p.answer), (p, reasoning_trace(p.a, p.op, p.b))
    assert reasoning_trace(347, "+", 589) == "7+9=16,4+8+1=13,3+5+1=9"
    assert reasoning_trace(347, "-", 189) == "17-9=8,14-8-1=5,3-1-1=1"
    rs = RewardSet({"accuracy": 1.0, "format": 1.0})
    import random
    rng = random.Random(0)
    right = [s(task.completion(p, st, rng), p.answer) for p in train[:20] for st in ("reason", "direct")]
    assert rs.score(right)[0].tolist() == [2.0] * 40
    wrong = [s(task.completion(p, "reason", rng, wrong=True), p.answer) for p in train[:40]]
    _, parts, _ = rs.score(wrong)
    assert parts["accuracy"].tolist() == [0.0] * 40 and parts["format"].tolist() == [1.0] * 40

"""GRPO against hand computations and float64 references: group advantages, the clipped surrogate with the KL
penalty (value, gradient, clip count), the KL estimator's unbiasedness, padding masks, skipped groups, the reference
refresh, data parallel == one process, and a DeepSeek-V3 policy."""
from __future__ import annotations

import math
import os
import statistics

import pytest
import torch
import torch.multiprocessing as mp

from framework.config import ModelConfig, OptimConfig
from framework.models.dense import DenseLM
from framework.rl.config import RLConfig
from framework.rl.grpo import (GRPO, Rollout, build_batch, group_advantages, grpo_loss, kl_estimator,
                               sequence_logprobs)
from framework.rl.rewards import RewardSet, register
from framework.rl.task import ArithmeticTask, CharTokenizer
from parallel.mesh import free_port as _free_port


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    adv, valid = group_advantages(r, std_floor=1e-4)
    assert valid.tolist() == [True, False, True]
    # group 0: mean 0.5, sample std sqrt(1/3)
    s0 = math.sqrt(((0.5**2) * 4) / 3)
    assert adv[0].tolist() == pytest.approx([0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], abs=1e-12)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]                      # zero variance: skipped
    m2, s2 = statistics.mean([2, 0, 0, 0]), statistics.stdev([2, 0, 0, 0])
    assert adv[2].tolist() == pytest.approx([(2 - m2) / s2] + [(0 - m2) / s2] * 3, abs=1e-12)
    # the floor bounds tiny spreads
    adv, valid = group_advantages(torch.tensor([[1.0, 1.0 + 1e-9]], dtype=torch.float64), std_floor=1e-3)
    assert valid.tolist() == [True]
    assert adv.abs().max().item() == pytest.approx(0.5e-9 / 1e-3, rel=1e-6)


def _reference_objective(logp, old, ref, adv, mask, eps, beta):
    """J and dJ/dlogp with plain Python floats: per output, the token mean of min(rho A, clip(rho) A) - beta KL."""
    N, T = len(logp), len(logp[0])
    J, grad, clipped = 0.0, [[0.0] * T for _ in range(N)], 0
    for i in range(N):
        L = sum(mask[i])
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            un, cl = rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i]
            d = ref[i][t] - logp[i][t]
            kl = math.exp(d) - d - 1
            J += (min(un, cl) - beta * kl) / L / N
            g_sur = rho * adv[i] if un <= cl else 0.0                   # the clipped branch has no gradient
            grad[i][t] = (g_sur - beta * (1 - math.exp(d))) / L / N
            clipped += cl < un
    return J, grad, clipped


def test_grpo_loss_value_gradient_and_clipping_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    N, T, eps, beta = 6, 7, 0.2, 0.05
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    logp = old + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5) * 0.9   # ratios in [0.64, 1.57]
    ref = old + (torch.rand(N, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.5, -0.7, 0.0, 2.0, -1.2, 0.3], dtype=torch.float64)
    lengths = [7, 3, 5, 1, 6, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)
    # padding holds garbage: it must not leak into the loss, gradient or statistics
    logp = torch.where(mask.bool(), logp, torch.full_like(logp, 30.0)).requires_grad_(True)
    loss, stats = grpo_loss(logp, old, ref, adv, mask, eps, beta)
    J, grad, clipped = _reference_objective(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(),
                                            mask.tolist(), eps, beta)
    assert loss.item() == pytest.approx(-J, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, -torch.tensor(grad, dtype=torch.float64), rtol=0, atol=1e-12)
    assert stats["clipped"] == clipped and clipped > 0                 # the data crosses both clip boundaries
    assert stats["tokens"] == sum(lengths)
    kl_ref = sum(sum((math.exp(r - l) - (r - l) - 1) for r, l, m in zip(rr, ll, mm) if m) / sum(mm)
                 for rr, ll, mm in zip(ref.tolist(), logp.tolist(), mask.tolist()))
    assert stats["kl"] == pytest.approx(kl_ref, abs=1e-12)
    # num_outputs rescales (data parallel: world / N_global); beta = 0 drops the penalty
    loss2, _ = grpo_loss(logp.detach(), old, ref, adv, mask, eps, beta, num_outputs=3)
    assert loss2.item() == pytest.approx(-J * N / 3, abs=1e-12)
    loss0, _ = grpo_loss(logp.detach(), old, None, adv, mask, eps, 0.0)
    J0, _, _ = _reference_objective(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), eps, 0.0)
    assert loss0.item() == pytest.approx(-J0, abs=1e-12)


def test_kl_estimator_is_exact_formula_and_unbiased():
    g = torch.Generator().manual_seed(1)
    pi = torch.softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    ref = torch.softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    k3 = kl_estimator(pi.log(), ref.log())
    torch.testing.assert_close(k3, ref / pi - (ref / pi).log() - 1, rtol=0, atol=1e-12)
    assert (k3 >= 0).all()
    # E_{x ~ pi}[k3(x)] = sum_x ref(x) - 1 + KL(pi || ref) = KL(pi || ref)
    expectation = (pi * k3).sum(-1)
    kl = (pi * (pi.log() - ref.log())).sum(-1)
    torch.testing.assert_close(expectation, kl, rtol=0, atol=1e-12)


def tiny_dense(vocab: int, dtype=torch.float32, seed: int = 0) -> DenseLM:
    torch.manual_seed(seed)
    return DenseLM(ModelConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=48, max_position_embeddings=64)).to(dtype)


def test_log_probs_of_padded_batch_equal_each_row_alone():
    model = tiny_dense(30, torch.float64)
    prompts = [[1, 4, 5], [1, 7], [1, 2, 3, 9]]
    comps = [[8, 8, 2], [3, 4, 5, 6, 2], [7]]
    ids, mask = build_batch(prompts, comps, pad_id=0)
    assert ids.shape == (3, 7) and mask.shape == (3, 6)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]]
    logp, ent = sequence_logprobs(model, ids, with_entropy=True)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        with torch.no_grad():
            alone = torch.log_softmax(model(torch.tensor([p + c]))[0].double(), -1)   # [len, V]
        want = [alone[len(p) - 1 + t, tok].item() for t, tok in enumerate(c)]
        got = logp[i][mask[i].bool()].tolist()
        assert got == pytest.approx(want, abs=1e-6)
        probs = alone[len(p) - 1:len(p) - 1 + len(c)].exp()
        assert ent[i][mask[i].bool()].tolist() == pytest.approx((-(probs * probs.log()).sum(-1)).tolist(), abs=1e-6)


# ------------------------------------------------------------------------------------------------------ the loop

def rl_config(**kw) -> RLConfig:
    base = dict(group_size=4, prompts_per_step=4, updates_per_batch=2, beta=0.04, clip_eps=0.2, lr=3e-3,
                warmup_steps=0, grpo_steps=3, max_new_tokens=6, task_max_digits=2)
    base.update(kw)
    return RLConfig(**base)


def fixed_rollout(tok, prompts_text, n_groups, G, seed=0):
    """A deterministic rollout: random completions; groups 1 and 3 have equal rewards (skipped), and both land on
    rank 1 of 2, so the ranks hold different numbers of outputs."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids, comp_ids = [], []
    for i in range(n_groups):
        p = [tok.bos_id] + tok.encode(prompts_text[i % len(prompts_text)])
        for _ in range(G):
            n = int(torch.randint(1, 6, (1,), generator=g))
            prompt_ids.append(p)
            comp_ids.append(torch.randint(7, tok.vocab_size, (n,), generator=g).tolist())
    rewards = torch.tensor([[1, 0, 2, 0], [1, 1, 1, 1], [0, 2, 2, 1], [0, 0, 0, 0], [2, 0, 0, 0], [1, 2, 0, 1]],
                           dtype=torch.float64)[:n_groups, :G]
    return Rollout(prompt_ids, comp_ids, rewards, [True] * len(comp_ids))


def shard(ro: Rollout, rank: int, world: int) -> Rollout:
    """Prompts rank::world, the way round_problems shards them."""
    G = ro.rewards.shape[1]
    groups = list(range(ro.rewards.shape[0]))[rank::world]
    rows = [q * G + j for q in groups for j in range(G)]
    return Rollout([ro.prompt_ids[r] for r in rows], [ro.completion_ids[r] for r in rows], ro.rewards[groups],
                   [True] * len(rows))


def _learn(rank: int, world: int, rollout: Rollout, rl: RLConfig):
    tok = CharTokenizer()
    model = tiny_dense(tok.vocab_size, torch.float64)
    opt = OptimConfig(weight_decay=0.0, grad_clip=0.0)
    grpo = GRPO(model, tok, ArithmeticTask(), RewardSet({"accuracy": 1.0}), rl, opt, rank, world)
    metrics = grpo.learn(shard(rollout, rank, world))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics


def _dp_worker(rank: int, world: int, port: int, rollout, rl, q):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state, metrics = _learn(rank, world, rollout, rl)
        q.put((rank, {k: v.numpy() for k, v in state.items()}, metrics))  # plain arrays: no shared-memory handles
    finally:
        dist.destroy_process_group()


def test_data_parallel_learn_equals_one_process():
    """Two ranks, each with half of the prompts (two equal-reward groups skipped, unevenly across ranks): the
    parameters after two optimizer steps with kept old log-probs equal one process learning from every prompt."""
    tok = CharTokenizer()
    rl = rl_config()
    rollout = fixed_rollout(tok, ["12+3=", "7+45=", "1+1=", "99+9="], n_groups=6, G=4)
    want, m1 = _learn(0, 1, rollout, rl)
    assert m1["groups/skipped"] == 2 and m1["clip_fraction"] > 0      # the second update is off-policy: clipping
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dp_worker, args=(r, 2, port, rollout, rl, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (s, m)) for r, s, m in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for r in range(2):
        state, m = results[r]
        for k in want:
            torch.testing.assert_close(torch.from_numpy(state[k]), want[k], rtol=1e-9, atol=1e-11)
        for k in ("reward/mean", "kl", "clip_fraction", "entropy", "loss", "groups/skipped", "response_length"):
            assert m[k] == pytest.approx(m1[k], rel=1e-9, abs=1e-7), k    # loss ~ 0 at ratio 1: rounding


def test_all_groups_skipped_means_no_update_and_reference_refresh():
    tok = CharTokenizer()
    rl = rl_config(ref_refresh_steps=2)
    model = tiny_dense(tok.vocab_size)
    grpo = GRPO(model, tok, ArithmeticTask(), RewardSet({"accuracy": 1.0}), rl, OptimConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ro = fixed_rollout(tok, ["1+2="], n_groups=3, G=4)
    ro.rewards[:] = 1.0
    m = grpo.learn(ro)
    assert m["groups/skipped"] == 3 and m["groups/skipped_fraction"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ro = fixed_rollout(tok, ["1+2="], n_groups=3, G=4)
    grpo.learn(ro)                                                     # round 2: learns, then refreshes pi_ref
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(grpo.ref.state_dict()[k], v) for k, v in model.state_dict().items())


@register("digit_share")
def _digit_share(sample, options):
    """Share of digits in the completion: varies between random samples, so groups are rarely skipped."""
    return sum(c.isdigit() for c in sample.completion) / max(len(sample.completion), 1)


@pytest.mark.parametrize("family", ["dense", "deepseek_v3"])
def test_grpo_round_on_the_task(family):
    """collect + learn on the real task with both model families: metrics present and sane, parameters moved,
    DeepSeek-V3's router biases updated from the training forwards only."""
    tok = CharTokenizer()
    rl = rl_config(temperature=1.5)
    torch.manual_seed(0)
    if family == "dense":
        model = tiny_dense(tok.vocab_size)
    else:
        from tests.framework.models.test_deepseek_v3 import tiny
        from framework.models.deepseek_v3 import DeepSeekV3
        model = DeepSeekV3(tiny(num_nextn_predict_layers=0, vocab_size=tok.vocab_size))
    rewards = RewardSet({"accuracy": 1.0, "format": 0.5, "length": 0.1, "digit_share": 1.0}, {"length_target": 3})
    grpo = GRPO(model, tok, ArithmeticTask(1, 2), rewards, rl, OptimConfig(), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = grpo.step()
    for k in ("reward/mean", "reward/std", "accuracy", "format_rate", "kl", "clip_fraction", "response_length",
              "entropy", "groups/skipped", "sampling/tokens_per_s", "reward/errors/accuracy", "reward/length"):
        assert k in m and math.isfinite(m[k]), k
    assert 1 <= m["response_length"] <= rl.max_new_tokens and m["entropy"] > 0
    assert m["reward/length"] < 0                                      # random text overshoots 3 tokens
    assert m["groups/skipped"] < rl.prompts_per_step
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "bias" not in k)
    if family == "deepseek_v3":
        biases = [k for k in before if k.endswith("e_score_correction_bias")]
        assert biases and any(not torch.equal(before[k], model.state_dict()[k]) for k in biases)

"""Group Relative Policy Optimization (DeepSeekMath §4.1; R1 §2.2.1), with rule-based rewards.

For every prompt q the old policy samples G outputs o_1..o_G with rewards r_i. The advantage of every token of o_i
is the group-normalized reward
    A_i = (r_i - mean(r)) / max(std(r), std_floor)                     std: torch's unbiased (n - 1) estimate
and a group whose rewards are all equal teaches nothing (A = 0): it is skipped (no loss, not counted in the mean)
and reported. The objective, maximized, is
    J = 1/N sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) - beta KL_it ]
    rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    KL_it  = pi_ref/pi - log(pi_ref/pi) - 1           (the unbiased, always positive estimator of KL(pi || pi_ref))
over the N outputs of the non-skipped groups of the whole batch (every rank together). pi_old is the policy that
sampled (its log-probs are computed once and kept for the rl.updates_per_batch optimizer steps on the batch);
pi_ref is a frozen copy, refreshed from the policy every rl.ref_refresh_steps rounds (R1: every 400 steps).

Data parallel: prompts are sharded over ranks (a group never straddles two ranks, so its advantages are local);
each rank scales its loss by world / N_global so that averaging gradients over ranks gives the gradient of J above.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from framework.rl.rewards import RewardSet, Scored
from framework.rl.sampling import sample
from framework.rl.sft import Updater, all_reduce_sum


# ---------------------------------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, std_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [P, G] -> advantages [P, G] (0 in skipped groups), valid [P] (False: every reward in the group equal)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True)
    valid = rewards.amax(dim=-1) > rewards.amin(dim=-1)
    adv = (rewards - mean) / std.clamp_min(std_floor)
    return adv * valid[:, None], valid


def kl_estimator(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token pi_ref/pi - log(pi_ref/pi) - 1 (Schulman's k3; DeepSeekMath eq. 4), >= 0, from log-probs."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor], adv: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, beta: float,
              num_outputs: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    """Loss = -J summed over these outputs and divided by num_outputs (default: their number).

    logp, old_logp, ref_logp, mask [N, T] (mask: 1 on the output's tokens); adv [N].
    Stats (detached, sums over these outputs so ranks can add them): kl (sum of per-output token-mean KL),
    clipped / tokens (tokens where the clipped term was the smaller one, i.e. its gradient was cut), ratio_sum.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None].to(logp.dtype)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a
    per_token = torch.minimum(unclipped, clipped)
    kl = kl_estimator(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta > 0:
        per_token = per_token - beta * kl
    lengths = mask.sum(dim=-1).clamp_min(1)
    per_output = (per_token * mask).sum(dim=-1) / lengths                     # token mean of each output
    n = float(adv.shape[0]) if num_outputs is None else float(num_outputs)
    loss = -per_output.sum() / n
    with torch.no_grad():
        stats = {"kl": ((kl * mask).sum(-1) / lengths).sum().item(),
                 "clipped": ((clipped < unclipped).to(logp.dtype) * mask).sum().item(),
                 "tokens": mask.sum().item(),
                 "ratio": (ratio * mask).sum().item()}
    return loss, stats


def sequence_logprobs(model, ids: torch.Tensor, with_entropy: bool = False):
    """ids [N, T] -> log p(ids[:, t+1] | ids[:, :t+1]) [N, T-1] (float32), and the entropy of each of those
    next-token distributions [N, T-1] when asked (detached)."""
    logits = model(ids[:, :-1]).float()                                       # [N, T-1, V]
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def build_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + completion rows. -> ids [N, T], mask [N, T-1] (1 where ids[:, t+1] is a completion
    token: the positions whose log-probs enter the loss)."""
    T = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    ids = torch.full((len(prompt_ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompt_ids), T - 1)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p) - 1:len(p) + len(c) - 1] = 1.0
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------

def round_problems(task, rl, seed: int, round_idx: int, rank: int, world: int):
    """The round's prompts (the same list on every rank), this rank's shard rank::world."""
    rng = random.Random(seed * 1_000_003 + round_idx)
    problems = [task.problem(rng, heldout=False) for _ in range(rl.prompts_per_step)]
    return problems[rank::world]


@dataclass
class Rollout:
    """One round's samples on this rank: rows = prompt * G + g."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    rewards: torch.Tensor                       # [P, G] float64, the weighted total
    finished: list[bool] = field(default_factory=list)
    parts: dict = field(default_factory=dict)   # reward name -> [P*G] values
    errors: dict = field(default_factory=dict)  # reward name -> errors in this round
    diagnostics: dict = field(default_factory=dict)  # accuracy, format -> [P*G]
    sampling: dict = field(default_factory=dict)     # new_tokens, seconds


class GRPO:
    def __init__(self, policy: torch.nn.Module, tok, task, rewards: RewardSet, rl, optim_cfg, rank: int = 0,
                 world: int = 1, group=None, seed: int = 0):
        self.policy, self.tok, self.task, self.rewards, self.rl = policy, tok, task, rewards, rl
        self.rank, self.world, self.group, self.seed = rank, world, group, seed
        self.device = next(policy.parameters()).device
        self.ref = self._frozen_copy() if rl.beta > 0 else None
        total = max(1, rl.grpo_steps * rl.updates_per_batch)
        # DeepSeek-V3's MTP depths (mtp.*) play no part in the policy's log-probs: they are left as they are
        self.updater = Updater(policy, rl.lr, total, optim_cfg, "constant", rl.warmup_steps, group, ("mtp.",))
        # accuracy and format are always measured, whatever rl.rewards weighs
        self.diagnostics = RewardSet({"accuracy": 1.0, "format": 1.0})
        self.generator = torch.Generator().manual_seed(seed * 7919 + rank)
        self.rounds = 0

    def _frozen_copy(self) -> torch.nn.Module:
        ref = copy.deepcopy(self.policy).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    def refresh_reference(self) -> None:
        if self.ref is not None:
            self.ref.load_state_dict(self.policy.state_dict())

    def step(self) -> dict:
        """One round: sample and score this rank's prompts, then learn from them. Returns global metrics."""
        return self.learn(self.collect())

    def collect(self) -> Rollout:
        rl, tok = self.rl, self.tok
        problems = round_problems(self.task, rl, self.seed, self.rounds, self.rank, self.world)
        prompts = [tok.encode_prompt(p.prompt) for p in problems]
        smp = sample(self.policy, prompts, rl.group_size, rl.max_new_tokens, rl.temperature, rl.top_p,
                     tok.eos_id, list(rl.stop), tok.decode, self.generator, rl.sample_batch)
        scored = [Scored(tok.decode(c), problems[i], len(c), f)
                  for i, c, f in zip(smp.prompt_index, smp.completion_ids, smp.finished)]
        total, parts, errors = self.rewards.score(scored)
        _, diag, _ = self.diagnostics.score(scored)
        return Rollout(smp.prompt_ids, smp.completion_ids, total.view(-1, rl.group_size), smp.finished, parts,
                       errors, diag, smp.stats)

    def learn(self, ro: Rollout) -> dict:
        """Advantages, then rl.updates_per_batch optimizer steps on the rollout (every rank calls it together)."""
        rl = self.rl
        G = ro.rewards.shape[1]
        adv, valid = group_advantages(ro.rewards, rl.std_floor)
        rows = [r for r in range(ro.rewards.numel()) if valid[r // G]]
        n_local = len(rows)
        n_global = int(all_reduce_sum([float(n_local)], self.group)[0])

        acc = {"kl": 0.0, "clipped": 0.0, "tokens": 0.0, "ratio": 0.0, "entropy": 0.0, "loss": 0.0}
        grad_norms, lr = [], self.updater.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        if n_global > 0:  # every rank agrees on this, so nobody waits in an all-reduce alone
            if n_local:
                ids, mask = build_batch([ro.prompt_ids[r] for r in rows], [ro.completion_ids[r] for r in rows],
                                        self.tok.pad_id, self.device)
                a = adv.flatten()[rows].to(self.device)
                with torch.no_grad():  # pi_old: the policy as it sampled, kept for every update on this batch
                    old_logp, _ = sequence_logprobs(self.policy, ids)
                    ref_logp = sequence_logprobs(self.ref, ids)[0] if self.ref is not None else None
            for u in range(rl.updates_per_batch):
                self.updater.zero_grad()
                if n_local:
                    logp, ent = sequence_logprobs(self.policy, ids, with_entropy=(u == 0))
                    # world / N_global: the average over ranks of the gradients is then the gradient of -J
                    loss, st = grpo_loss(logp, old_logp, ref_logp, a, mask, rl.clip_eps, rl.beta,
                                         num_outputs=n_global / self.world)
                    loss.backward()
                    if u == 0:  # the sampling policy itself: its KL to the reference and its entropy
                        acc["kl"] += st["kl"]
                        acc["entropy"] += (ent * mask).sum().item()
                        acc["tokens"] += st["tokens"]
                        acc["loss"] += loss.item()
                    acc["clipped"] += st["clipped"] / rl.updates_per_batch
                    acc["ratio"] += st["ratio"] / rl.updates_per_batch
                grad_norms.append(self.updater.step()["grad_norm"])
        t_update = time.perf_counter() - t0
        self.rounds += 1
        if rl.ref_refresh_steps and self.rounds % rl.ref_refresh_steps == 0:
            self.refresh_reference()

        # global metrics: sums over ranks
        total = ro.rewards.flatten()
        lengths = torch.tensor([float(len(c)) for c in ro.completion_ids])
        names = list(ro.parts)
        diag = [ro.diagnostics[k].sum().item() if k in ro.diagnostics else 0.0 for k in ("accuracy", "format")]
        sums = [float(total.numel()), total.sum().item(), (total**2).sum().item(), *diag, lengths.sum().item(),
                float((~valid).sum()), float(valid.numel()), acc["kl"], acc["clipped"], acc["tokens"], acc["ratio"],
                acc["entropy"], acc["loss"], float(ro.sampling.get("new_tokens", 0)),
                float(ro.sampling.get("seconds", 0.0)), float(sum(not f for f in ro.finished))]
        sums += [float(ro.errors.get(k, 0)) for k in names] + [ro.parts[k].sum().item() for k in names]
        g = all_reduce_sum(sums, self.group)
        n, tok_n = max(g[0], 1.0), max(g[10], 1.0)
        mean_r = g[1] / n
        metrics = {"reward/mean": mean_r, "reward/std": max(g[2] / n - mean_r**2, 0.0) ** 0.5,
                   "accuracy": g[3] / n, "format_rate": g[4] / n, "response_length": g[5] / n,
                   "groups/skipped": g[6], "groups/skipped_fraction": g[6] / max(g[7], 1.0),
                   "kl": g[8] / max(n_global, 1), "clip_fraction": g[9] / tok_n, "ratio_mean": g[11] / tok_n,
                   "entropy": g[12] / tok_n, "loss": g[13] / self.world, "truncated": g[16],
                   "sampling/tokens_per_s": g[14] / max(g[15] / self.world, 1e-9),
                   "lr": lr, "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
                   "time/sample_s": float(ro.sampling.get("seconds", 0.0)), "time/update_s": t_update}
        for j, name in enumerate(names):
            metrics[f"reward/errors/{name}"] = g[17 + j]
            metrics[f"reward/{name}"] = g[17 + len(names) + j] / n
        return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation on held-out problems
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, tok, problems, rl, temperature: float, rank: int = 0, world: int = 1, group=None,
             seed: int = 0) -> dict:
    """Accuracy, format rate, mean length and reasoning rate (a non-empty <think> block) of one completion per
    problem; problems sharded rank::world, results summed over ranks."""
    from framework.rl.task import END_THINK, THINK

    mine = problems[rank::world]
    prompts = [tok.encode_prompt(p.prompt) for p in mine]
    gen = torch.Generator().manual_seed(seed * 31 + rank + 1)
    smp = sample(model, prompts, 1, rl.max_new_tokens, temperature, rl.top_p, tok.eos_id, list(rl.stop),
                 tok.decode, gen, rl.sample_batch)
    texts = [tok.decode(c) for c in smp.completion_ids]
    scored = [Scored(t, mine[i], len(c), f) for i, t, c, f in zip(smp.prompt_index, texts, smp.completion_ids,
                                                                   smp.finished)]
    _, d, _ = RewardSet({"accuracy": 1.0, "format": 1.0}).score(scored)
    reasons = [float(t.startswith(THINK) and not t.startswith(THINK + END_THINK)) for t in texts]
    s = all_reduce_sum([float(len(mine)), d["accuracy"].sum().item(), d["format"].sum().item(),
                        float(sum(len(c) for c in smp.completion_ids)), sum(reasons), smp.stats["new_tokens"],
                        smp.stats["seconds"]], group)
    n = max(s[0], 1.0)
    return {"accuracy": s[1] / n, "format_rate": s[2] / n, "response_length": s[3] / n, "reason_rate": s[4] / n,
            "tokens_per_s": s[5] / max(s[6] / world, 1e-9), "problems": s[0]}

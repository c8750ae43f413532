"""Supervised fine-tuning on {prompt, completion} pairs (cold start / distillation, R1 §2.3.1 and §2.4).

Each example is tokenized as  <s> prompt completion <eos>; the loss covers the completion and <eos> only (labels
-100 on <s>, the prompt and padding). With rl.sft_pack several examples share one sequence of rl.sft_seq_len tokens:
they are separated by <s>, and later examples can attend to earlier ones (the dense model has no document mask);
<s> is also the first token of every prompt at sampling time, so the model learns to treat it as a fresh start.
An example longer than the sequence is cut (and counted). Without packing every example has its own row.

Also here: `Updater`, the optimizer plumbing SFT and GRPO share (AdamW with the trainer's decay rule, the lr schedule
of framework/optim/lr.py, data-parallel gradient averaging, global-norm clipping, DeepSeek-V3 bias updates).
"""
from __future__ import annotations

import math
import random
import time
from typing import Optional

import torch
import torch.distributed as dist

from parallel.data_parallel import average_gradients

IGNORE = -100


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing and packing
# ---------------------------------------------------------------------------------------------------------------------

def encode_example(tok, prompt: str, completion: str, messages=None) -> tuple[list[int], int]:
    """-> (ids = <s> prompt completion <eos>, index of the first completion token). A tokenizer with a chat template
    frames the prompt (or the chat's earlier turns) as its template does."""
    head = tok.encode_prompt(prompt, messages)
    return head + tok.encode(completion) + [tok.eos_id], len(head)


def example_labels(ids: list[int], start: int) -> list[int]:
    """Labels aligned with ids (label[t] is the target of position t): ids[t+1] where that token belongs to the
    completion (t + 1 >= start), else IGNORE; the last position has no target inside the example."""
    return [ids[t + 1] if t + 1 >= start else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def pack_examples(encoded: list[tuple[list[int], int]], seq_len: int, pad_id: int,
                  pack: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> input_ids [R, seq_len], labels [R, seq_len], number of examples cut to fit.

    pack=True fills each row with whole examples in order (first fit: an example that does not fit in the rest of
    the row starts the next one); pack=False puts one example per row. Padding is pad_id with label IGNORE.
    """
    rows_ids, rows_lab, cut = [], [], 0
    cur_ids: list[int] = []
    cur_lab: list[int] = []

    def flush():
        if cur_ids:
            n = seq_len - len(cur_ids)
            rows_ids.append(cur_ids + [pad_id] * n)
            rows_lab.append(cur_lab + [IGNORE] * n)
    for ids, start in encoded:
        labels = example_labels(ids, start)
        if len(ids) > seq_len:
            ids, labels, cut = ids[:seq_len], labels[:seq_len - 1] + [IGNORE], cut + 1
        if not pack or len(cur_ids) + len(ids) > seq_len:
            flush()
            cur_ids, cur_lab = [], []
        cur_ids = cur_ids + ids
        cur_lab = cur_lab + labels
    flush()
    return torch.tensor(rows_ids, dtype=torch.long), torch.tensor(rows_lab, dtype=torch.long), cut


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer plumbing shared with GRPO
# ---------------------------------------------------------------------------------------------------------------------

def all_reduce_sum(values: list[float], group=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t.tolist()


class Updater:
    """AdamW + lr schedule + data-parallel averaging + clipping for one model.

    step() expects every rank to have back-propagated its share of the loss such that the MEAN over ranks of the
    gradients is the gradient wanted (average_gradients divides by the world size). Parameters whose names start
    with one of `exclude` are not updated at all (no weight decay either).
    """

    def __init__(self, model: torch.nn.Module, lr: float, total_steps: int, optim_cfg, schedule: str,
                 warmup: int, group=None, exclude: tuple[str, ...] = ()):
        from framework.optim.lr import make_scheduler
        from framework.trainer import adamw_param_groups

        if group is None and dist.is_initialized():  # None means every process, as in torch.distributed
            group = dist.group.WORLD
        self.model, self.group, self.clip = model, group, optim_cfg.grad_clip
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith(exclude)]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(adamw_param_groups(named, optim_cfg.weight_decay), lr=lr,
                                           betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                                           foreach=False)
        self.scheduler = make_scheduler(self.optimizer, max(total_steps, 1), schedule, warmup,
                                        optim_cfg.min_lr_ratio, optim_cfg.decay_fraction)
        self.balanced = model.moe_layers() > 0     # auxiliary-loss-free balancing (framework/models/capabilities.py)
        self.steps = 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> dict:
        """Average, clip, step. Returns lr, grad_norm (before clipping) and whether the step was applied."""
        for p in self.params:  # every rank reduces the same list of tensors, even a rank without samples
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        average_gradients(self.params, self.group)
        norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in self.params))  # replicas agree
        lr = self.optimizer.param_groups[0]["lr"]
        applied = math.isfinite(norm)
        if applied:
            if self.clip > 0 and norm > self.clip:
                for p in self.params:
                    p.grad.mul_(self.clip / (norm + 1e-6))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.steps += 1
        if self.balanced:
            self._update_biases()
        return {"lr": lr, "grad_norm": norm, "skipped": float(not applied)}

    def _update_biases(self) -> None:
        """Aux-loss-free balancing (V3 §2.1.2) on the loads of this step's training forwards, summed over ranks."""
        loads = self.model.expert_loads()
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(loads, group=self.group)
        # at the full rate throughout: the model's stop fraction is pre-training's (V3: its last 500B tokens)
        self.model.update_balance(loads, 0, 1)   # the counts restart


# ---------------------------------------------------------------------------------------------------------------------
# The SFT loop
# ---------------------------------------------------------------------------------------------------------------------

def run_sft(model: torch.nn.Module, tok, examples: list[dict], rl, optim_cfg, metrics, rank: int = 0,
            world: int = 1, group=None, seed: int = 0, step_offset: int = 0,
            log_every: int = 10, device: Optional[torch.device] = None) -> list[dict]:
    """rl.sft_steps optimizer steps over `examples`; each step takes rl.sft_batch_size packed rows (all ranks),
    this rank the rows rank::world. Rows are reshuffled every epoch with the same seed on every rank."""
    device = device or next(model.parameters()).device
    encoded = [encode_example(tok, e["prompt"], e["completion"], e.get("messages")) for e in examples]
    ids, labels, cut = pack_examples(encoded, rl.sft_seq_len, tok.pad_id, rl.sft_pack)
    if cut and rank == 0:
        print(f"sft: {cut} of {len(encoded)} examples were longer than rl.sft_seq_len={rl.sft_seq_len} and were cut",
              flush=True)
    upd = Updater(model, rl.sft_lr, rl.sft_steps, optim_cfg, optim_cfg.schedule, optim_cfg.warmup_steps, group)
    rng = random.Random(seed)
    order: list[int] = []
    history = []
    model.train()
    for step in range(1, rl.sft_steps + 1):
        t0 = time.perf_counter()
        while len(order) < rl.sft_batch_size:  # epochs of shuffled rows, identical on every rank
            perm = list(range(ids.shape[0]))
            rng.shuffle(perm)
            order += perm
        batch, order = order[:rl.sft_batch_size], order[rl.sft_batch_size:]
        mine = torch.tensor(batch[rank::world])
        x, y = ids[mine].to(device), labels[mine].to(device)
        upd.zero_grad()
        loss, _ = model.compute_loss(x, y)
        loss.backward()
        out = upd.step()
        n_tok = int((y != IGNORE).sum())
        loss_sum, tok_sum = all_reduce_sum([loss.item(), float(n_tok)], group)
        dt = time.perf_counter() - t0
        row = {"sft/loss": loss_sum / world, "sft/lr": out["lr"], "sft/grad_norm": out["grad_norm"],
               "sft/target_tokens": tok_sum, "sft/step_time_s": dt,
               "sft/tokens_per_s": rl.sft_batch_size * rl.sft_seq_len / dt}
        history.append(row)
        if metrics is not None:
            metrics.log(step_offset + step, row)
        if rank == 0 and log_every and (step % log_every == 0 or step == rl.sft_steps):
            print(f"sft step {step}/{rl.sft_steps} | loss {row['sft/loss']:.4f} | lr {out['lr']:.2e}", flush=True)
    return history

"""DeepSeekMoE (V3 §2.1.2): shared experts + many fine-grained routed experts, bias-corrected top-k routing.

The forward is cut into stages with explicit boundaries, so an expert-parallel all-to-all (and its overlap with
other work) can replace the middle without touching the rest:

    gate(x)                          -> topk_idx [N, K], topk_weight [N, K]       (Router)
    dispatcher.dispatch(x, idx, w)   -> x_sorted [M, C], tokens_per_expert [E_local], ctx
    experts(x_sorted, tokens_per_expert) -> y_sorted [M, C]                       (only this rank's experts)
    dispatcher.combine(y_sorted, ctx)-> y [N, C]  (= sum_k w_k * expert_k(x), for every token)
    + shared_experts(x)

The dispatchers live in parallel/: `LocalDispatcher` (parallel/dispatch.py) is the single-process one; an
expert-parallel one (parallel/expert.py) sends rows to the ranks owning the experts and returns them in `combine`.
No token is ever dropped (V3 §2.1.2: no token dropping in training or inference), so M = N * K locally.

`MoE.forward_steps` is the same forward cut where the tokens travel, for a schedule that runs another chunk's work
while they do (the sub-stage protocol of schedules/overlap.py); `MoE.shard_experts` keeps one expert-parallel rank's
slice (framework/models/expert_parallel.py).

Expert weights are stacked per layer, gate_up_proj [E, 2I, C] (gate rows first, then up rows) and down_proj
[E, C, I], in nn.Linear's [out, in] orientation: one grouped GEMM covers all experts, and the Hugging Face
per-expert layout (experts.E.gate_proj/up_proj/down_proj) is a slice/concat away (framework/models/hf.py).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Generator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.models.layers import SwiGLU, recomputed
from framework.weight_grad import grouped_linear, split_linear
from parallel.dispatch import Dispatcher, LocalDispatcher

Steps = Generator[str, None, object]  # yields a label at each exchange it leaves in flight; returns its result


# --------------------------------------------------------------------------------------------------------------------
# Router
# --------------------------------------------------------------------------------------------------------------------

class Router(nn.Module):
    """Affinities s = sigmoid(W x) (or softmax); experts are CHOSEN on s + b but WEIGHTED by s (V3 eq. 12-16).

    b = e_score_correction_bias is a buffer moved by the balancing rule in balance.py, never by the optimizer. The
    gate weight and the bias stay fp32 even when the model is cast to bf16 (V3 §3.3 keeps gating in high precision).
    `load` counts the tokens routed to each expert since the last reset (read by balance.expert_loads), in training
    forwards only (training mode, gradients enabled): evaluation, sampling and no-grad replays leave it alone, and
    `tally`, when set (balance.tally_loads), counts every forward apart from it.
    """
    defers_weight_grad = True

    def __init__(self, cfg):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func = cfg.scoring_func
        self.topk_method = cfg.topk_method
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"model.scoring_func={self.scoring_func!r}: allowed: sigmoid, softmax")
        if self.topk_method not in ("noaux_tc", "greedy"):
            raise ValueError(f"model.topk_method={self.topk_method!r}: allowed: noaux_tc, greedy")
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # integer counts: exact at any scale, untouched by model.to(dtype), summable with all_reduce
        self.register_buffer("load", torch.zeros(self.n_experts, dtype=torch.int64), persistent=False)
        self.tally: Optional[torch.Tensor] = None

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not lower the gate: cast back whatever floating dtype `fn` produced
        super()._apply(fn, recurse)
        for t in (self.weight, self.e_score_correction_bias):
            if t.dtype in (torch.float16, torch.bfloat16):
                t.data = t.data.float()
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities [N, E] in fp32 (or float64 when the model runs in float64)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = split_linear(x.to(dtype), self.weight.to(dtype))
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def route(self, x: torch.Tensor):
        """x [N, C] -> topk_idx [N, K] (int64), topk_weight [N, K], scores [N, E]."""
        s = self.scores(x)
        choice = s + self.e_score_correction_bias.to(s.dtype) if self.topk_method == "noaux_tc" else s
        if self.n_group > 1:
            choice = self._limit_groups(choice)
        with torch.no_grad():
            topk_idx = torch.topk(choice, self.top_k, dim=-1, sorted=False)[1]
        topk_weight = s.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.routed_scaling_factor
        counting = self.training and torch.is_grad_enabled()
        if counting or self.tally is not None:
            with torch.no_grad():
                counts = torch.bincount(topk_idx.flatten(), minlength=self.n_experts)
                if counting:
                    self.load += counts
                if self.tally is not None:
                    self.tally += counts.to(self.tally.device)
        return topk_idx, topk_weight, s

    def forward(self, x: torch.Tensor):
        topk_idx, topk_weight, _ = self.route(x)
        return topk_idx, topk_weight

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the topk_group best groups per token, -inf elsewhere (group-limited routing, V3 §2.1.2).

        noaux_tc scores a group by the sum of its two best biased affinities, as DeepSeek and Hugging Face do;
        greedy (unbiased) scores a group by its best affinity, as DeepSeek-V2's group-limited greedy routing.
        """
        N = choice.shape[0]
        grouped = choice.detach().view(N, self.n_group, self.n_experts // self.n_group)  # [N, G, E/G] (N may be 0)
        if self.topk_method == "noaux_tc":
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
        else:
            group_score = grouped.amax(dim=-1)
        keep_groups = torch.topk(group_score, self.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
        keep = keep[:, :, None].expand_as(grouped).reshape(N, self.n_experts)
        return choice.masked_fill(~keep, float("-inf"))


# --------------------------------------------------------------------------------------------------------------------
# Routed experts
# --------------------------------------------------------------------------------------------------------------------

GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Experts(nn.Module):
    """The routed SwiGLU experts this process owns: `expert_ids` (a range of global ids, default all).

    forward(x_sorted [M, C], tokens_per_expert [E_local]) -> [M, C]: rows grouped by local expert in order.
    expert_impl=grouped runs one torch._grouped_mm per projection (offsets = cumulative group sizes; no host sync)
    where it applies (float32/bfloat16/float16, hidden_size and moe_intermediate_size multiples of 16 bytes), and the
    per-expert loop otherwise (float64 reference runs); expert_impl=loop always runs one matmul per expert.

    linear_fn (None by default) replaces both grouped GEMMs when set, for other GEMM numerics (FP8, emulated bf16:
    framework/fp8 sets it): linear_fn(x [M, K], counts [E_local] ints, weight [E_local, N, K], proj) -> [M, N], with
    proj "gate_up_proj" or "down_proj" naming the weight (so per-projection statistics can be kept). The weight
    gradients of every path can be deferred to W (framework/weight_grad.py); a linear_fn says so with
    `defers_weight_grad = True`.
    """
    takes_linear_fn = True   # what a precision conversion (framework/fp8) looks for: it may set linear_fn

    def __init__(self, cfg, local_experts: Optional[range] = None):
        super().__init__()
        E, C, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.expert_ids = range(E) if local_experts is None else local_experts
        ids = self.expert_ids
        if not isinstance(ids, range) or len(ids) == 0 or ids.start < 0 or ids.stop > E or ids.step != 1:
            raise ValueError(f"local_experts={local_experts!r}: must be a non-empty contiguous range inside [0, {E})")
        self.impl = cfg.expert_impl
        if self.impl not in ("grouped", "loop"):
            raise ValueError(f"model.expert_impl={self.impl!r}: allowed: grouped, loop")
        self.hidden, self.inter, self.n_global = C, I, E
        n = len(self.expert_ids)
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * I, C))           # [E_local, 2I, C]: gate rows, up rows
        self.down_proj = nn.Parameter(torch.empty(n, C, I))                  # [E_local, C, I]
        self.linear_fn: Optional[Callable] = None

    @property
    def defers_weight_grad(self) -> bool:
        return self.linear_fn is None or getattr(self.linear_fn, "defers_weight_grad", False)

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
        if self.linear_fn is not None:
            return self._with_linear_fn(x_sorted, tokens_per_expert)
        if self.impl == "grouped":
            return self._grouped(x_sorted, tokens_per_expert)
        return self._loop(x_sorted, tokens_per_expert)

    def forward_recomputed(self, x_sorted: torch.Tensor, tokens_per_expert) -> torch.Tensor:
        """forward(), keeping the grouped GEMMs' outputs and recomputing the SwiGLU product in backward. Experts with
        custom GEMM numerics (linear_fn, e.g. FP8) run as they are."""
        if self.linear_fn is not None:
            return self(x_sorted, tokens_per_expert)
        return recomputed(self, x_sorted, tokens_per_expert)

    def slice(self, local: range) -> "Experts":
        """A new Experts holding `local` (global expert ids inside this module's), with copies of their weights."""
        lo, hi = local.start - self.expert_ids.start, local.stop - self.expert_ids.start
        if lo < 0 or hi > len(self.expert_ids) or local.step != 1:
            raise ValueError(f"local_experts={local!r}: the module holds only experts {self.expert_ids!r}")
        spec = SimpleNamespace(n_routed_experts=self.n_global, hidden_size=self.hidden,
                               moe_intermediate_size=self.inter, expert_impl=self.impl)
        new = Experts(spec, local).to(device=self.gate_up_proj.device, dtype=self.gate_up_proj.dtype)
        with torch.no_grad():
            new.gate_up_proj.copy_(self.gate_up_proj[lo:hi])
            new.down_proj.copy_(self.down_proj[lo:hi])
        new.gate_up_proj.requires_grad_(self.gate_up_proj.requires_grad)
        new.down_proj.requires_grad_(self.down_proj.requires_grad)
        new.linear_fn = self.linear_fn
        return new

    def grouped_mm_applies(self, x: torch.Tensor) -> bool:
        """torch._grouped_mm takes float32/bfloat16/float16 with every row stride a multiple of 16 bytes."""
        if x.dtype not in GROUPED_DTYPES:
            return False
        align = 16 // x.element_size()
        return self.hidden % align == 0 and self.inter % align == 0

    def _grouped(self, x, tokens_per_expert):
        if not self.grouped_mm_applies(x):
            # float64 (reference runs) or odd widths: the same computation, one expert at a time
            return self._loop(x, tokens_per_expert)
        counts = torch.as_tensor(tokens_per_expert, device=x.device)
        offs = torch.cumsum(counts, dim=0).to(torch.int32)                   # end row of each expert's group
        gate_up = grouped_linear(x.contiguous(), self.gate_up_proj, offs=offs)    # [M, 2I]
        gate, up = gate_up.split(self.inter, dim=-1)
        h = (F.silu(gate) * up).contiguous()                                 # [M, I]
        return grouped_linear(h, self.down_proj, offs=offs)                  # [M, C]

    def _with_linear_fn(self, x, tokens_per_expert):
        counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
        gate, up = self.linear_fn(x, counts, self.gate_up_proj, "gate_up_proj").split(self.inter, dim=-1)
        return self.linear_fn(F.silu(gate) * up, counts, self.down_proj, "down_proj")  # [M, C]

    def _loop(self, x, tokens_per_expert):
        counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
        gate, up = grouped_linear(x, self.gate_up_proj, counts=counts).split(self.inter, dim=-1)
        return grouped_linear(F.silu(gate) * up, self.down_proj, counts=counts)    # [M, C]


# --------------------------------------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------------------------------------

class MoE(nn.Module):
    """Router + routed experts + shared experts. Names follow Hugging Face: gate, experts, shared_experts.

    Balance losses (optional, only while training): the sequence-wise loss of V3 eq. 17-20 (seq_aux_loss_alpha) and
    the classic batch-wise auxiliary loss (aux_loss_alpha, Switch/GShard style, for comparisons). Their value is
    left in `self.aux_loss` (with grad) until someone adds it to a loss: `take_balance_loss()` hands it over (the
    model's final(), a pipeline stage that holds no final(); see balance.collect_aux_loss).
    """

    def __init__(self, cfg, local_experts: Optional[range] = None):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = Experts(cfg, local_experts)
        n_shared = cfg.n_shared_experts
        self.shared_experts = SwiGLU(cfg.hidden_size, n_shared * cfg.moe_intermediate_size) if n_shared else None
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.n_routed_experts)
        self.seq_aux_loss_alpha = getattr(cfg, "seq_aux_loss_alpha", 0.0)
        self.aux_loss_alpha = getattr(cfg, "aux_loss_alpha", 0.0)
        self.aux_loss: Optional[torch.Tensor] = None

    def route(self, x: torch.Tensor):
        """Stage 1. x [B, T, C] -> tokens [N, C], topk_idx [N, K], topk_weight [N, K] (+ the balance loss)."""
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        topk_idx, topk_weight, scores = self.gate.route(flat)
        if self.training and (self.seq_aux_loss_alpha > 0 or self.aux_loss_alpha > 0):
            self.aux_loss = self.balance_loss(scores, topk_idx, B, T)
        return flat, topk_idx, topk_weight

    def take_balance_loss(self) -> Optional[torch.Tensor]:
        """The balance loss of the last training forward (None if none), cleared: whoever takes it adds it."""
        loss, self.aux_loss = self.aux_loss, None
        return loss

    def shard_experts(self, local: range, dispatcher: Dispatcher) -> None:
        """Keep only the routed experts `local` (global ids) and move tokens with `dispatcher` (expert parallelism)."""
        if self.experts.expert_ids != local:
            self.experts = self.experts.slice(local)
        self.dispatcher = dispatcher

    @property
    def exchanges_tokens(self) -> bool:
        """Whether the dispatcher moves tokens between processes with exchanges it can start and wait for."""
        return hasattr(self.dispatcher, "start_dispatch") and hasattr(self.dispatcher, "group")

    def _check_experts(self) -> None:
        if isinstance(self.dispatcher, LocalDispatcher) and len(self.experts.expert_ids) != self.n_experts:
            raise ValueError(f"local_experts={self.experts.expert_ids!r}: a partial expert set needs an "
                             f"expert-parallel dispatcher (moe.dispatcher)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_experts()
        flat, topk_idx, topk_weight = self.route(x)
        x_sorted, tokens_per_expert, ctx = self.dispatcher.dispatch(flat, topk_idx, topk_weight)   # stage 2
        y_sorted = self.experts(x_sorted, tokens_per_expert)                                        # stage 3
        y = self.dispatcher.combine(y_sorted, ctx)                                                  # stage 4
        if self.shared_experts is not None:  # independent of routing: can run while tokens travel
            y = y + self.shared_experts(flat)
        return y.view(x.shape)

    def balance_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """alpha * sum_i f_i P_i with f_i = E/(K*T) * #tokens picking i and P_i = mean normalized affinity.

        Sequence-wise (V3 eq. 17-20): f and P per sequence, loss averaged over the B sequences.
        Batch-wise (classic): f and P over all B*T tokens.
        """
        E, K = self.n_experts, self.top_k
        s_norm = scores / scores.sum(dim=-1, keepdim=True)                  # s'_{i,t}: normalized over experts
        loss = scores.new_zeros(())
        if self.seq_aux_loss_alpha > 0:
            hits = torch.zeros(B, E, device=scores.device, dtype=scores.dtype)
            hits.scatter_add_(1, topk_idx.view(B, T * K), torch.ones_like(topk_idx.view(B, T * K), dtype=scores.dtype))
            f = hits * (E / (K * T))                                         # [B, E]
            P = s_norm.view(B, T, E).mean(dim=1)                             # [B, E]
            loss = loss + self.seq_aux_loss_alpha * (f * P).sum(dim=1).mean()
        if self.aux_loss_alpha > 0:
            hits = torch.bincount(topk_idx.flatten(), minlength=E).to(scores.dtype)
            f = hits * (E / (K * B * T))
            P = s_norm.mean(dim=0)
            loss = loss + self.aux_loss_alpha * (f * P).sum()
        return loss

    # -----------------------------------------------------------------------------------------------------------
    def _shared(self, flat: torch.Tensor, recompute: bool) -> torch.Tensor:
        return self.shared_experts.forward_recomputed(flat) if recompute else self.shared_experts(flat)

    def _routed(self, x_sorted: torch.Tensor, tokens_per_expert, recompute: bool) -> torch.Tensor:
        return self.experts.forward_recomputed(x_sorted, tokens_per_expert) if recompute else \
            self.experts(x_sorted, tokens_per_expert)

    def forward_steps(self, x: torch.Tensor, tape, recompute: bool = False) -> Steps:
        """forward(x) as steps (training): yields each time it leaves an exchange in flight, returns y [B, T, C].

        `tape` (schedules/overlap.py's Tape) records the pieces between exchanges: tensors crossing an exchange are
        cut from the autograd graph there, and each exchange leaves its backward, which starts the reverse exchange
        itself and yields while it travels. The balance loss is handed to the tape, which back-propagates it in
        its own piece. recompute: the SwiGLU products (shared and routed experts) are recomputed in backward.
        Numerically forward(x), forward values and gradients alike.
        """
        flat, topk_idx, topk_weight = self.route(x)                            # [N, C], [N, K], [N, K]
        aux = self.take_balance_loss()
        if aux is not None:
            tape.add_loss(aux)
        d = self.dispatcher
        if not self.exchanges_tokens:  # every expert is in this process: nothing travels, nothing to overlap
            self._check_experts()
            x_sorted, tokens_per_expert, ctx = d.dispatch(flat, topk_idx, topk_weight)
            y = d.combine(self._routed(x_sorted, tokens_per_expert, recompute), ctx)
            if self.shared_experts is not None:
                y = y + self._shared(flat, recompute)
            return y.view(x.shape)

        # ---- dispatch: rows leave; the routing weights stay (ctx.weight keeps their graph to the leaf `topk_weight`)
        flat, topk_weight = tape.cut(flat), tape.cut(topk_weight)
        if getattr(d, "needs_counts", True):
            counting = d.start_counts(flat.detach(), topk_idx, topk_weight)
            yield f"{d.name}.counts"
            pending = counting.start_rows()
        else:  # padded layout: no counts to wait for, the rows leave at once and travel under three turns
            pending = d.start_dispatch(flat.detach(), topk_idx, topk_weight)
            yield f"{d.name}.dispatch"
        # the shared expert needs no travelling token: it runs under its own block's row exchange, and its backward
        # (a piece of its own) has a turn of its own in combine_backward
        shared, shared_backward = None, lambda: None
        if self.shared_experts is not None:
            shared, shared_backward = tape.aside(self._shared(flat, recompute))  # [N, C]
        yield f"{d.name}.dispatch"
        x_sorted, tokens_per_expert, ctx = pending.wait()                      # [M_recv, C], [E_local]
        x_sorted = x_sorted.detach().requires_grad_()

        def dispatch_backward() -> Steps:
            # expert-input gradients go back to the tokens' ranks
            g_sorted = x_sorted.grad if x_sorted.grad is not None else torch.zeros_like(x_sorted)
            returning = d.start_dispatch_backward(g_sorted, ctx)
            # the weight gradients held back so far (V3 Figure 4's ATTN(W)) run under this exchange: without them only
            # the other chunk's routed experts would
            tape.run_deferred_w()
            yield f"{d.name}.dispatch.backward"
            _add_grad(flat, returning.wait())

        tape.exchange(dispatch_backward)

        # ---- routed experts, then their outputs go home
        y_sorted = tape.cut(self._routed(x_sorted, tokens_per_expert, recompute))   # [M_recv, C]
        returning_rows = d.start_combine_rows(y_sorted, ctx)
        yield f"{d.name}.combine"
        y_back = returning_rows.wait().requires_grad_()                        # [M_send, C]

        def combine_backward() -> Steps:
            # output-row gradients go to the ranks that ran the experts
            g_back = y_back.grad if y_back.grad is not None else torch.zeros_like(y_back)
            returning = d.start_combine_backward(g_back, ctx)
            yield f"{d.name}.combine.backward"
            # a turn of its own for compute that needs no exchange, the shared expert's backward: the other chunk's
            # token counts (or, padded layout, its rows) travel under it
            shared_backward()
            yield f"{d.name}.combine.backward"
            g_sorted = returning.wait()
            if y_sorted.requires_grad:
                _add_grad(y_sorted, g_sorted)

        tape.exchange(combine_backward)

        # ---- in forward()'s order: combine, then + shared
        y = d.weighted_sum(y_back, ctx, y_sorted.dtype)
        if shared is not None:
            y = y + shared
        return y.view(x.shape)


def _add_grad(leaf: torch.Tensor, grad: torch.Tensor) -> None:
    leaf.grad = grad if leaf.grad is None else leaf.grad + grad

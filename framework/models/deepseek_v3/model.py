"""DeepSeek-V3 (V3 §2): MLA attention, DeepSeekMoE feed-forward (the first k layers dense), optional MTP depths.

Same outline as every duet model (see dense.py):
  embed -> layers (block(h) -> h) -> norm -> lm_head;  mtp: D extra depths sharing embed and lm_head
  forward(input_ids [B, T]) -> main logits [B, T, V]
  compute_loss(input_ids, labels) -> (loss, metrics) = final(layers(embed_tokens(input_ids)), input_ids, labels)
  final(h, input_ids, labels): norm + head + main loss + MTP losses + balance losses (what the last stage runs)
  flops_per_token(seq_len): training FLOPs per token counting ACTIVATED parameters only

Loss = L_main + lambda/D * sum_k L_mtp_k (V3 eq. 24-25) + balance losses; lambda = `mtp_lambda`, moved from
mtp_loss_weight to mtp_loss_weight_late by `set_progress` (V3 §4.2: 0.3 for the first 10T tokens, then 0.1).

Sub-stages (V3 §3.2.1, Figure 4): `Block.forward_steps` and `DeepSeekV3.final_steps` are the training forward cut
where the MoE tokens travel, as generators that yield while an exchange is in flight (the protocol of
schedules/overlap.py, whose Tape they receive). Per MoE block:

    attention   h1 = h + MLA(norm(h)),  x = norm(h1),  route(x)     compute
    counts      how many rows go to each expert                    all-to-all (tiny; the host must read it)
    dispatch    rows to the ranks owning their experts             all-to-all
    shared      shared expert(x), needs no travelling token        compute
    experts     routed experts (grouped GEMM)                      compute
    combine     expert outputs back to the tokens' ranks           all-to-all
    residual    h1 + sum_k w_k * expert_k(x) + shared(x)           compute (runs on into the next block)
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn as nn

from framework.models.deepseek_v3 import balance
from framework.models.deepseek_v3.balance import collect_aux_loss
from framework.models.deepseek_v3.mla import MLA, LatentCache, RotaryTables
from framework.models.deepseek_v3.moe import Experts, MoE, Router, Steps
from framework.models.deepseek_v3.mtp import MTPLayer, depth_inputs, token_loss
from framework.models.layers import RMSNorm, SwiGLU, maybe_recomputed


def is_moe_layer(cfg, layer_idx: int) -> bool:
    """MoE from layer first_k_dense_replace on (every moe_layer_freq-th); V3: layers 0-2 dense, 3-60 MoE."""
    return (cfg.n_routed_experts > 0 and layer_idx >= cfg.first_k_dense_replace
            and layer_idx % max(1, getattr(cfg, "moe_layer_freq", 1)) == 0)


def _check_config(cfg) -> None:
    if cfg.name != "deepseek_v3":
        raise ValueError(f"model.name={cfg.name!r}: DeepSeekV3 needs model.name=deepseek_v3")
    from framework.config import validate_model
    validate_model(cfg)  # ConfigError (a ValueError) naming the key
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"model.hidden_act={cfg.hidden_act!r}: allowed: silu")


def _rope_scaling(cfg) -> Optional[dict]:
    s = getattr(cfg, "rope_scaling", None)
    return None if s is None else dict(s)


class Block(nn.Module):
    """Pre-norm decoder block: h + MLA(norm(h)), then h + FFN(norm(h)) with FFN = SwiGLU (dense) or MoE."""

    def __init__(self, cfg, layer_idx: int, rotary: RotaryTables, moe: bool, local_experts: Optional[range] = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, local_experts) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    # the two halves, separately callable so a schedule can interleave another chunk's work between them
    def attention(self, h: torch.Tensor, start_pos: int = 0, cache: Optional[LatentCache] = None) -> torch.Tensor:
        return h + self.self_attn(self.input_layernorm(h), start_pos, cache)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, h: torch.Tensor, start_pos: int = 0, cache: Optional[LatentCache] = None) -> torch.Tensor:
        return self.feed_forward(self.attention(h, start_pos, cache))

    def forward_steps(self, h: torch.Tensor, tape, recompute: bool = False) -> Steps:
        """forward(h) (training: no cache) as steps: a MoE block yields while its tokens travel (MoE.forward_steps),
        a dense one runs in one piece. recompute: RMSNorm outputs and SwiGLU products are recomputed in backward."""
        if not isinstance(self.mlp, MoE):
            if not recompute:
                return self(h)
            h = self._attention(h, recompute)
            return h + self.mlp.forward_recomputed(maybe_recomputed(self.post_attention_layernorm, h, recompute))
        h1 = self._attention(h, recompute)
        x = maybe_recomputed(self.post_attention_layernorm, h1, recompute)
        if self.mlp.exchanges_tokens:
            h1 = tape.cut(h1)            # the residual is read after the exchanges
        return h1 + (yield from self.mlp.forward_steps(x, tape, recompute))

    def _attention(self, h: torch.Tensor, recompute: bool) -> torch.Tensor:
        return h + self.self_attn(maybe_recomputed(self.input_layernorm, h, recompute), 0, None)


class DeepSeekV3(nn.Module):
    """`local_experts`: the range of routed experts this process holds (expert parallelism); None = all."""

    def __init__(self, cfg, local_experts: Optional[range] = None):
        super().__init__()
        _check_config(cfg)
        self.config = cfg
        C, L, D = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_nextn_predict_layers
        self.rotary = RotaryTables(cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                   _rope_scaling(cfg), interleaved=getattr(cfg, "rope_interleave", True))
        self.embed = nn.Embedding(cfg.vocab_size, C)
        self.layers = nn.ModuleList(Block(cfg, i, self.rotary, is_moe_layer(cfg, i), local_experts) for i in range(L))
        self.norm = RMSNorm(C, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        # MTP depth k is layer L + k - 1 of the checkpoint and always MoE
        self.mtp = nn.ModuleList(MTPLayer(cfg, Block(cfg, L + k, self.rotary, True, local_experts)) for k in range(D))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.mtp_lambda = cfg.mtp_loss_weight
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Experts):
            nn.init.normal_(m.gate_up_proj, std=std)
            nn.init.normal_(m.down_proj, std=std)
        elif isinstance(m, Router):
            nn.init.normal_(m.weight, std=std)

    # ---------------------------------------------------------------------------------------------------------------
    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1] -> MTP loss weight (V3 §4.2: 0.3 then 0.1)."""
        c = self.config
        self.mtp_lambda = c.mtp_loss_weight if fraction < c.mtp_weight_switch_fraction else c.mtp_loss_weight_late

    # the rest of the training capabilities (framework/models/capabilities.py): auxiliary-loss-free balancing
    def moe_layers(self) -> int:
        return len(balance.routers(self))

    def expert_loads(self) -> torch.Tensor:
        """[MoE layers, experts] tokens routed by this process since the last update (main layers, then MTP)."""
        return balance.expert_loads(self)

    def update_balance(self, loads: torch.Tensor, step: int, steps: int) -> None:
        """b += u * sign(mean - load) per layer from `loads` summed over all ranks; u = 0 once `step` reaches
        bias_update_stop_fraction of `steps` (V3: the last 500B tokens). The counts restart."""
        c = self.config
        balance.update_biases(self, loads, balance.bias_update_rate(c, step, steps))
        balance.reset_loads(self)

    def head_modules(self) -> dict[str, nn.Module]:
        """Modules a pipeline's last part holds besides norm and lm_head: the multi-token prediction depths."""
        return {"mtp": self.mtp} if len(self.mtp) else {}

    def head_reads_embedding(self) -> bool:
        """Whether the last part reads the embedding (the MTP depths embed their shifted tokens, V3 §2.2)."""
        return len(self.mtp) > 0

    @contextlib.contextmanager
    def tally_loads(self):
        """Count the expert loads of the forwards run inside the block, in any mode, apart from the training counts;
        yields a list that holds the [MoE layers, experts] counts once the block ends."""
        with balance.tally_loads([self]) as out:
            yield out

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)                                         # [B, T, C]

    def hidden_states(self, input_ids: torch.Tensor, start_pos: int = 0,
                      caches: Optional[Sequence[LatentCache]] = None) -> torch.Tensor:
        """Output of the last block (before the final norm), [B, T, C]."""
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, None if caches is None else caches[i])
        return h

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0,
                caches: Optional[Sequence[LatentCache]] = None) -> torch.Tensor:
        logits = self.lm_head(self.norm(self.hidden_states(input_ids, start_pos, caches)))   # [B, T, V]
        collect_aux_loss(self)  # logits only: drop balance losses nobody will add
        return logits

    def final(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor):
        """Everything after the last block. Returns (loss to back-propagate, detached metrics)."""
        h_main = self.norm(h)
        main = token_loss(self.lm_head(h_main), labels)
        loss, metrics = main, {"loss/main": main.detach()}
        if len(self.mtp):
            h_k, mtp_losses = h_main, []
            for k, depth in enumerate(self.mtp, start=1):
                ids_k, target_k = depth_inputs(input_ids, labels, k)
                h_k = depth(h_k, self.embed_tokens(ids_k))
                mtp_losses.append(token_loss(self.lm_head(h_k), target_k))
            mtp = torch.stack(mtp_losses).mean()                            # 1/D sum_k L_k
            loss = loss + self.mtp_lambda * mtp
            metrics["loss/mtp"] = mtp.detach()
        balance = collect_aux_loss(self)
        if balance is not None:
            loss = loss + balance
            metrics["loss/balance"] = balance.detach()
        metrics["loss/total"] = loss.detach()
        return loss, metrics

    def final_steps(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor, tape,
                    recompute: bool = False) -> Steps:
        """final(h, input_ids, labels) as steps, so that the MoE blocks of the multi-token prediction depths exchange
        their tokens under another chunk too. The same loss value and metrics as final(), and the same gradients but
        for the output head's (shared by the main and the MTP losses, its uses land in different pieces and are
        summed in another order); each depth's balance loss goes to the tape like the blocks'."""
        if not len(self.mtp):
            return self.final(h, input_ids, labels)
        # each head's loss is made where its input is, and read by the last piece through tape.carry
        h_k = self.norm(h)
        losses = [(token_loss(self.lm_head(h_k), labels), tape.open)]
        for k, depth in enumerate(self.mtp, start=1):
            ids_k, target_k = depth_inputs(input_ids, labels, k)
            x = depth.project(h_k, self.embed_tokens(ids_k))                  # [B, T, C]
            h_k = depth.shared_head.norm((yield from depth.block.forward_steps(x, tape, recompute)))
            losses.append((token_loss(self.lm_head(h_k), target_k), tape.open))
        main, *mtp_losses = [tape.carry(loss, made_in) for loss, made_in in losses]
        mtp = torch.stack(mtp_losses).mean()                                  # 1/D sum_k L_k
        loss, metrics = main + self.mtp_lambda * mtp, {"loss/main": main.detach(), "loss/mtp": mtp.detach()}
        balance = tape.take_losses()
        if balance:
            total = balance[0]
            for aux in balance[1:]:
                total = total + aux
            loss = loss + total          # the value only: each balance loss back-propagates from its own piece
            metrics["loss/balance"] = total
        metrics["loss/total"] = loss.detach()
        return loss, metrics

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor):
        return self.final(self.hidden_states(input_ids), input_ids, labels)

    # ---------------------------------------------------------------------------------------------------------------
    def activated_parameters(self, include_embedding: bool = False, include_mtp: bool = True) -> float:
        """Parameters one token meets: routed experts count K/E of their layer's total (top-K of E experts)."""
        K = self.config.num_experts_per_tok
        skip = (() if include_embedding else ("embed.",)) + (() if include_mtp else ("mtp.",))
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith(skip))
        if self.config.tie_word_embeddings and not include_embedding:
            n += self.lm_head.weight.numel()  # the head is a matmul even when it shares the embedding's storage
        for name, m in self.named_modules():
            if isinstance(m, Experts) and not name.startswith(skip):
                routed = m.gate_up_proj.numel() + m.down_proj.numel()
                n += routed / len(m.expert_ids) * K - routed   # per-expert size * K, whatever slice is held here
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """6 * activated matmul parameters (lm_head once per head use: main + D depths) + attention scores/values.

        Attention: per layer, QK^T over qk_nope+qk_rope dims and PV over v dims, 2 FLOPs each, x3 for training,
        full (not causal-halved) T as in dense.py's estimate.
        """
        c = self.config
        D = len(self.mtp)
        n = self.activated_parameters(include_embedding=False)
        n += D * self.lm_head.weight.numel()
        attn_layers = c.num_hidden_layers + D
        per_layer = 6.0 * c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len
        return 6.0 * n + attn_layers * per_layer


def count_parameters(cfg, include_mtp: bool = False) -> tuple[int, int]:
    """(total, activated) parameters of `cfg`, built on the meta device (no memory is allocated).

    total: every stored parameter. activated: the parameters a token's computation multiplies by: attention,
    dense FFNs, shared experts, the gates, top-K of E routed experts and the output head; the input embedding is a
    row lookup and is left out (counting it adds vocab_size * hidden_size, 0.93B for V3).
    MTP depths are excluded by default: V3's 671B / 37B describe the main model (the checkpoint adds a 14B MTP module,
    11.6B of its own plus copies of the embedding and head).
    """
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    total = sum(p.numel() for name, p in model.named_parameters() if include_mtp or not name.startswith("mtp."))
    activated = model.activated_parameters(include_embedding=False, include_mtp=include_mtp)
    return total, int(round(activated))

"""What each layer of a DeepSeek-V3-style model costs per token: parameters, FLOPs, bytes kept for backward.

Everything is a formula of the model config (no module is built), so the 671B preset costs nothing to plan.
Parameter counts must equal framework.models.deepseek_v3.count_parameters (tests/framework/plan check it); FLOPs
count 2 per multiply-add of the activated weights, as the model's flops_per_token does.

Two profiles of what a layer keeps for backward (`fused`):
  eager  this project's torch modules as they run (cpu): every RMSNorm keeps input, normalised input and output,
         attention keeps Q, K, V, the softmax probabilities [H, T] per token and its output, experts keep their
         gathered inputs, the gate/up output and the weighted outputs; cross-entropy keeps the log-probabilities.
         Checked against autograd's saved tensors (framework.fp8.memory.saved_tensor_bytes) in the tests.
  fused  the V3 recipe on GPUs (V3 §3.2.3, §3.3): flash attention (O and the log-sum-exp, no [T, T] matrix),
         RMSNorm and MLA up-projections recomputed (their inputs kept), linear inputs cached in FP8 (1 byte + a
         fp32 scale per 1x128 tile) when FP8 is on, the attention output in E5M6 (1.5 bytes), the SwiGLU input
         cached and its output recomputed, the routing weight applied to the SwiGLU output (so the combine keeps no
         expert outputs), cross-entropy fused in chunks (no logits kept). Without FP8, 2-byte copies instead.
"""
from __future__ import annotations

from dataclasses import dataclass


# One linear's shape per token, for pricing each GEMM at the speed of its own shape (framework/plan/estimate.py):
# (rows per token, in features, out features, kind) -> how many such GEMMs a forward runs. rows per token is 1 for
# a token's own linears and K/E for each routed expert (its share of the dispatched rows); kind says which rate a
# device without a measured table uses: "dense" (FP8-able), "expert" (FP8-able, runs on the dispatched rows) or
# "high" (kept in high precision: router, head, MTP projection).
Gemm = tuple[float, int, int, str]


def merge_gemms(*lists) -> tuple[tuple[Gemm, int], ...]:
    out: dict[Gemm, int] = {}
    for entries in lists:
        for g, n in entries:
            if g[0] * g[1] * g[2] * n:                 # a shared expert of width 0 runs no GEMM
                out[g] = out.get(g, 0) + n
    return tuple(sorted(out.items()))


def gemm_flops_of(gemms) -> tuple[float, float, float]:
    """(FP8-able, high-precision, of which expert) forward FLOPs per token of a GEMM list: 2 per multiply-add."""
    dense = high = expert = 0.0
    for (rows, k, n, kind), count in gemms:
        f = 2.0 * rows * k * n * count
        if kind == "high":
            high += f
        else:
            dense += f
            expert += f if kind == "expert" else 0.0
    return dense, high, expert


def gemm_rows(rows_per_token: float, tokens: float) -> int:
    """Rows of a GEMM that takes `rows_per_token` of `tokens` tokens (a routed expert: its even share K/E)."""
    return max(1, round(rows_per_token * tokens))


def rank_gemm(gemm: Gemm, count: int, ep: int) -> tuple[Gemm, float]:
    """A linear as one rank of `ep` expert-parallel ranks runs it: a routed expert's GEMM is E/ep experts (of E)
    each taking ep x K/E rows per token of the rank's micro-batch (the tokens of all ep ranks dispatched to it);
    the same FLOPs, a taller shape. Every other linear is the rank's own."""
    rows, k, n, kind = gemm
    if kind != "expert" or ep <= 1:
        return gemm, count
    return (rows * ep, k, n, kind), count / ep


def gemm_shapes(m, tokens: float, ep: int = 1) -> list[tuple[int, int, int]]:
    """The distinct (rows, in, out) linears of the model (its blocks, head and MTP depths) at `tokens` tokens per
    micro-batch, as one of `ep` expert-parallel ranks runs them: what a device measures to price each GEMM at its
    own shape."""
    pieces = [block_cost(m, is_moe_layer(m, i), 1, 4, False, False) for i in range(m.num_hidden_layers)]
    pieces.append(head_cost(m, 1, 4, False, False))
    return sorted({(gemm_rows(g[0], tokens), g[1], g[2]) for c in pieces for g, _ in
                   (rank_gemm(g, n, ep) for g, n in c.gemms)})


SMALL_TENSOR = 4096   # OptimizerStateManager's small_tensor_threshold: smaller tensors keep fp32 moments


def _small(*sizes: int) -> int:
    return sum(n for n in sizes if n < SMALL_TENSOR)


def _get(cfg, key, default=None):
    return getattr(cfg, key, default)


@dataclass(frozen=True)
class LayerCost:
    """Per-token costs of one piece of the model (a decoder layer, the embedding, the head with its MTP depths)."""
    params: int = 0            # parameters held in full by every rank of its stage (attention, norms, dense FFN, ...)
    expert_params: int = 0     # routed-expert parameters (sharded over expert parallelism)
    gemm_flops: float = 0.0    # forward FLOPs per token of the linears that FP8 may run (attention, FFN, experts)
    bf16_flops: float = 0.0    # forward FLOPs per token of linears kept in high precision (router, head, MTP proj)
    attn_flops: float = 0.0    # forward FLOPs per token of the attention core (QK^T and PV)
    act_bytes: float = 0.0     # bytes kept for backward per token
    recompute_bytes: float = 0.0  # bytes rebuilt per token in backward (fused: norms, up-projections, SwiGLU out)
    moe: bool = False          # this layer dispatches tokens to routed experts
    ops: int = 0               # eager (aten) operators per forward; backward runs ~1.6x as many (host time on cpu)
    tensors: int = 0           # parameter tensors (the optimizer's per-tensor work)
    small_params: int = 0      # parameters in tensors under SMALL_TENSOR elements (their moments stay fp32)
    fp32_params: int = 0       # parameters kept in fp32 whatever the training dtype (the router)
    blocks: int = 0            # decoder blocks (MLA layers) in it
    moe_blocks: int = 0        # of which MoE: each dispatches and combines once per pass
    up_proj_flops: float = 0.0  # forward FLOPs per token of the MLA up-projections (recomputed in a fused backward)
    expert_flops: float = 0.0  # of gemm_flops: the routed experts' (they run where the tokens were dispatched)
    shared_flops: float = 0.0  # of gemm_flops: the shared experts' (MoE blocks)
    gemms: tuple = ()          # ((rows per token, in, out, kind), count) of every linear: their FLOPs are the above
    logits: int = 0            # logits per token that go through log-softmax and the loss (V per output-head use)
    zeroed: int = 0            # values per call of weight-sized buffers zeroed outside the weights' own gradients

    def __add__(self, other: "LayerCost") -> "LayerCost":
        return LayerCost(self.params + other.params, self.expert_params + other.expert_params,
                         self.gemm_flops + other.gemm_flops, self.bf16_flops + other.bf16_flops,
                         self.attn_flops + other.attn_flops, self.act_bytes + other.act_bytes,
                         self.recompute_bytes + other.recompute_bytes, self.moe or other.moe, self.ops + other.ops,
                         self.tensors + other.tensors, self.small_params + other.small_params,
                         self.fp32_params + other.fp32_params, self.blocks + other.blocks,
                         self.moe_blocks + other.moe_blocks, self.up_proj_flops + other.up_proj_flops,
                         self.expert_flops + other.expert_flops, self.shared_flops + other.shared_flops,
                         merge_gemms(self.gemms, other.gemms), self.logits + other.logits,
                         self.zeroed + other.zeroed)


def is_moe_layer(m, i: int) -> bool:
    """The model's rule (framework.models.deepseek_v3.model.is_moe_layer), restated to keep this module torch-free."""
    return m.n_routed_experts > 0 and i >= m.first_k_dense_replace and i % max(1, _get(m, "moe_layer_freq", 1)) == 0


def _fp8_bytes(n: float, fp8: bool) -> float:
    """A cached linear input: FP8 values plus one fp32 scale per 1x128 tile (V3 §3.3.2), else bf16."""
    return n * (1 + 4 / 128) if fp8 else 2.0 * n


def attention_params(m) -> int:
    C, H = m.hidden_size, m.num_attention_heads
    dn, dr, dv, r, q = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank, m.q_lora_rank
    query = C * q + q + q * H * (dn + dr) if q else C * H * (dn + dr)
    return query + C * (r + dr) + r + r * H * (dn + dv) + H * dv * C


def block_cost(m, moe: bool, seq_len: int, dtype_bytes: int, fused: bool, fp8: bool) -> LayerCost:
    """One decoder block (MLA + dense SwiGLU or MoE), per token."""
    C, H = m.hidden_size, m.num_attention_heads
    dn, dr, dv, r, q = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank, m.q_lora_rank
    E, K, Im = m.n_routed_experts, m.num_experts_per_tok, m.moe_intermediate_size
    Ish, I = Im * m.n_shared_experts, m.intermediate_size
    a = dtype_bytes
    attn_p = attention_params(m)
    attn_linear = attn_p - (q or 0) - r                                  # minus the two latent norms
    params = attn_p + 2 * C
    # causal attention: the eager path multiplies the full [T, T] (as flops_per_token counts it), a flash kernel
    # skips the masked half
    T_eff = seq_len / 2 if fused else seq_len
    attn_flops = 2.0 * H * (dn + dr + dv) * T_eff
    gemm = 2.0 * attn_linear
    bf16 = 0.0
    if fused:
        act = 2 * C + 4 + _fp8_bytes(C, fp8)                               # residual, rstd, fp8 input of q_a/kv_a
        act += (2 * q + 4) if q else 0                                     # q_a output (its norm is recomputed)
        act += 2 * (r + dr) + 4                                            # kv_a output (latent norm recomputed)
        act += (1.5 if fp8 else 2.0) * H * dv + 4 * H                      # attention output (E5M6), log-sum-exp
        recompute = 2 * C + (2 * q if q else 0) + 2 * r + 2 * H * (2 * dn + 2 * dr + dv)   # norms, Q, K, V
    else:
        act = a * ((3 * C + 1) + ((3 * q + 1) if q else 0) + (r + dr) + 1 + 2 * r
                   + 2 * H * (dn + dr) + H * seq_len + 2 * H * dv)
        recompute = 0.0
    small = _small(C, C, r, *((q,) if q else ()))                      # RMSNorm weights
    fp32 = 0
    query = [((1, C, q, "dense"), 1), ((1, q, H * (dn + dr), "dense"), 1)] if q else [((1, C, H * (dn + dr), "dense"), 1)]
    gemms = query + [((1, C, r + dr, "dense"), 1), ((1, r, H * (dn + dv), "dense"), 1), ((1, H * dv, C, "dense"), 1)]
    ops = 120   # aten operators of this project's block forward (counted in tests/framework/plan)
    tensors = (7 if q else 5) + 2
    if moe:
        params += E * C + 3 * C * Ish
        expert_params = 3 * C * Im * E
        small += _small(E * C)                                             # the router
        fp32 = E * C
        expert_flops, shared_flops = 2.0 * K * 3 * C * Im, 2.0 * 3 * C * Ish
        gemm += expert_flops + shared_flops
        bf16 += 2.0 * E * C                                                # the router stays high precision
        gemms += [((1, C, E, "high"), 1), ((1, C, Ish, "dense"), 2), ((1, Ish, C, "dense"), 1),   # gate, up, down
                  ((K / E, C, 2 * Im, "expert"), E), ((K / E, Im, C, "expert"), E)]   # experts: gate/up fused
        if fused:
            act += 2 * C + 4 + _fp8_bytes(C, fp8) + 4 * E + 12 * K         # residual, rstd, input, scores, top-k
            act += K * (_fp8_bytes(C, fp8) + _fp8_bytes(2 * Im, fp8))      # dispatched rows, SwiGLU inputs
            act += _fp8_bytes(2 * Ish, fp8)                                # shared expert's SwiGLU input
            recompute += 2 * C + K * 2 * Im + 2 * Ish                      # norm, SwiGLU outputs
        else:
            act += a * (3 * C + 1) + (4 * E + E + 8 * K + 4 + 4 * K) + 16 * K   # norm; router scores, mask, top-k
            act += a * (K * (3 * C + 4 * Im + 1) + 4 * Ish)                # experts (gathered, gate/up, out), shared
        ops += 61
        tensors += 6
    else:
        params += 3 * C * I
        expert_params = 0
        expert_flops = shared_flops = 0.0
        gemm += 2.0 * 3 * C * I
        gemms += [((1, C, I, "dense"), 2), ((1, I, C, "dense"), 1)]                    # gate, up, down
        if fused:
            act += 2 * C + 4 + _fp8_bytes(C, fp8) + _fp8_bytes(2 * I, fp8)
            recompute += 2 * C + 2 * I
        else:
            act += a * ((3 * C + 1) + 4 * I)
        ops += 15
        tensors += 3
    return LayerCost(params=params, expert_params=expert_params, gemm_flops=gemm, bf16_flops=bf16,
                     attn_flops=attn_flops, act_bytes=act, recompute_bytes=recompute, moe=moe, ops=ops,
                     tensors=tensors, small_params=small,
                     fp32_params=fp32, blocks=1, moe_blocks=int(moe),
                     up_proj_flops=2.0 * ((q or C) * H * (dn + dr) + r * H * (dn + dv)),
                     expert_flops=expert_flops, shared_flops=shared_flops, gemms=merge_gemms(gemms))


def embedding_cost(m) -> LayerCost:
    # its backward builds the weight's gradient as a dense V x C buffer, zeroed, then adds the looked-up rows
    return LayerCost(params=m.vocab_size * m.hidden_size, act_bytes=0.0, ops=2, tensors=1,
                     zeroed=m.vocab_size * m.hidden_size)


def head_cost(m, seq_len: int, dtype_bytes: int, fused: bool, fp8: bool, tied: bool = False) -> LayerCost:
    """Final norm, output head and loss, then the D MTP depths (V3 §2.2; they share embedding and head)."""
    C, V, D = m.hidden_size, m.vocab_size, m.num_nextn_predict_layers
    a = dtype_bytes
    head_act = (2 * C + 4 + 2 * C) if fused else (a * (3 * C + 1) + 4 * V)   # norm in, rstd, head in | + log-probs
    out = LayerCost(params=C + (0 if tied else V * C), bf16_flops=2.0 * V * C, act_bytes=head_act, ops=30,
                    tensors=2 - int(tied), small_params=_small(C), gemms=(((1, C, V, "high"), 1),), logits=V)
    for _ in range(D):
        proj = LayerCost(params=2 * C + 2 * C * C + C, bf16_flops=2.0 * (2 * C * C) + 2.0 * V * C,
                         act_bytes=(2 * 2 * C + 8 + 2 * 2 * C + head_act) if fused
                         else a * (3 * C + 2 * C + 2) + head_act, ops=45, tensors=4,
                         small_params=_small(C, C, C),
                         gemms=(((1, 2 * C, C, "high"), 1), ((1, C, V, "high"), 1)), logits=V,
                         zeroed=V * C)   # the depth looks up the shared embedding: another dense V x C gradient
        out = out + proj + block_cost(m, True, seq_len, dtype_bytes, fused, fp8)
    return out


def model_parameters(m, include_mtp: bool = False) -> int:
    """Total parameters, as count_parameters(cfg, include_mtp) counts them."""
    C, L = m.hidden_size, m.num_hidden_layers
    blocks = sum((block_cost(m, is_moe_layer(m, i), 1, 4, False, False) for i in range(L)), LayerCost())
    tied = bool(_get(m, "tie_word_embeddings", False))
    total = blocks.params + blocks.expert_params + embedding_cost(m).params + C + (0 if tied else m.vocab_size * C)
    if include_mtp:
        mtp = 2 * C + 2 * C * C + C + sum_params(block_cost(m, True, 1, 4, False, False))
        total += m.num_nextn_predict_layers * mtp
    return total


def sum_params(c: LayerCost) -> int:
    return c.params + c.expert_params


def flops_per_token(m, seq_len: int) -> float:
    """Training FLOPs per token as the model reports them (DeepSeekV3.flops_per_token: 6 x the activated parameters
    but the embedding, routed experts at K/E, the head once per use, attention over the full T): the MFU numerator,
    the same as the trainer's."""
    L, D, C = m.num_hidden_layers, m.num_nextn_predict_layers, m.hidden_size
    blocks = [block_cost(m, is_moe_layer(m, i), seq_len, 4, False, False) for i in range(L)]
    blocks += [block_cost(m, True, seq_len, 4, False, False) for _ in range(D)]
    share = m.num_experts_per_tok / m.n_routed_experts if m.n_routed_experts else 0.0
    activated = sum(c.params + c.expert_params * share for c in blocks)
    activated += C + (1 + D) * m.vocab_size * C + D * (2 * C + 2 * C * C + C)   # norm, head per use, MTP extras
    return 6.0 * activated + 3.0 * sum(c.attn_flops for c in blocks)

"""The one typed schema of duet.

Every knob is a field with a default and a one-line doc, grouped like conf/: model, parallel, optim, data, logging, fp8,
train. Hydra composes conf/config.yaml against these dataclasses (registered in its ConfigStore), so a wrong type or an
unknown key is rejected while composing; `validate()` then checks ranges and combinations before any process group
starts. Every error is one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import II, MISSING, DictConfig, OmegaConf

from framework.rl.config import RLConfig


class ConfigError(ValueError):
    """A bad configuration value. str(err) is the one-line message shown to the user."""


@dataclass
class ModelConfig:
    """Hyper-parameters of the model. Names follow Hugging Face's DeepSeek-V3 config.json so checkpoints map 1:1."""
    name: str = "dense"                    # registry key: dense | deepseek_v3
    vocab_size: int = II("data.vocab_size")  # must cover the tokenizer's vocabulary
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 344           # dense SwiGLU width
    max_position_embeddings: int = 512     # longest sequence the rotary tables are built for
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN: {type: yarn, factor, original_max_position_embeddings, ...}; null = plain RoPE. Typed Any (checked by
    # validate) because OmegaConf cannot merge a command-line dict into a null Optional[dict] node.
    rope_scaling: Any = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_bias: bool = False
    # --- MLA (V3 §2.1.1) ---
    q_lora_rank: Optional[int] = None      # query compression rank; null = no query compression
    kv_lora_rank: int = 64                 # KV compression rank (512 in V3)
    qk_rope_head_dim: int = 16             # decoupled RoPE head dim (64 in V3)
    qk_nope_head_dim: int = 32             # (128 in V3)
    v_head_dim: int = 32                   # (128 in V3)
    # --- DeepSeekMoE (V3 §2.1.2) ---
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    first_k_dense_replace: int = 1         # the first k layers use a dense MLP
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"          # sigmoid | softmax
    topk_method: str = "noaux_tc"          # noaux_tc (bias-corrected top-k) | greedy
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    n_group: int = 1                       # expert groups for group/node-limited routing
    topk_group: int = 1                    # groups a token may use
    expert_impl: str = "grouped"           # grouped (torch._grouped_mm where available) | loop (reference)
    bias_update_rate: float = 1e-3         # u of aux-loss-free balancing (V3 §2.1.2)
    bias_update_stop_fraction: float = 1.0  # u becomes 0 after this fraction of training (V3: last 500B tokens)
    seq_aux_loss_alpha: float = 0.0        # complementary sequence-wise balance loss (V3 uses 1e-4); 0 = off
    aux_loss_alpha: float = 0.0            # classic auxiliary balance loss (baseline for comparisons); 0 = off
    # --- multi-token prediction (V3 §2.2) ---
    num_nextn_predict_layers: int = 0      # D
    mtp_loss_weight: float = 0.3           # lambda for the first mtp_weight_switch_fraction of training
    mtp_loss_weight_late: float = 0.1      # lambda afterwards
    mtp_weight_switch_fraction: float = 0.7
    attn_impl: str = "naive"               # MLA path: naive | absorb
    init_from: Optional[str] = None        # Hugging Face DeepSeek-V3 folder: its config.json sets the architecture
                                           # (model.* overrides on the command line still win) and its weights start
                                           # the run, whatever the parallel layout


@dataclass
class CommConfig:
    sm_budget: int = 20                    # SMs (CTAs) the expert-parallel communicator may use on CUDA (V3 §3.2.2)
    emulate_link: Any = None               # {latency_us, gbps}: emulated interconnect for CPU benchmarks; null = off
                                           # (typed Any, checked by validate: see model.rope_scaling)
    dispatch: str = "counts"               # MoE dispatch message: counts (token counts first, then the routed rows)
                                           # | padded (every token to every ep rank, fixed size: no count exchange)


@dataclass
class ParallelConfig:
    pp: int = 1                            # pipeline stages (ranks along the pipeline)
    dp: Optional[int] = None               # data-parallel size; null = world_size / pp
    ep: int = 1                            # expert-parallel size, divides dp
    schedule: str = "1f1b"                 # dualpipe | dualpipev | 1f1b | zb1p | gpipe
    layers_per_part: Optional[list[int]] = None  # layers in each pipeline part; null = balanced
    overlap: bool = True                   # overlap MoE all-to-all inside F&B pairs
    recompute: bool = False                # recompute RMSNorm and SwiGLU outputs in backward (V3 §3.3), pipeline parts
    timeout_s: float = 300.0               # collective timeout
    backend: str = "auto"                  # auto (nccl on cuda, gloo on cpu) | gloo | nccl
    comm: CommConfig = field(default_factory=CommConfig)


@dataclass
class OptimStateConfig:
    exp_avg: str = "fp32"                  # fp32 | bf16 | fp8
    exp_avg_sq: str = "fp32"               # fp32 | bf16 | fp8


@dataclass
class OptimConfig:
    lr: float = 3e-3                       # peak learning rate
    min_lr_ratio: float = 0.1              # final lr = lr * min_lr_ratio
    beta1: float = 0.9
    beta2: float = 0.95                    # V3 §4.2
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: str = "cosine"               # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2            # wsd: fraction of steps spent decaying at the end
    grad_clip: float = 1.0                 # max global grad norm; 0 = off
    zero: bool = False                     # ZeRO-1: shard optimizer state (and master weights) over data-parallel ranks
    convert_state: bool = False            # resuming from a checkpoint whose moments have another format converts them
    state: OptimStateConfig = field(default_factory=OptimStateConfig)


@dataclass
class DataConfig:
    path: Optional[str] = None             # null = embedded corpus (this Python's stdlib .py files); a folder or file of
                                           # text; or a pre-tokenized .bin (nanoGPT layout, uint16/uint32)
    cache_dir: str = "data/cache"          # where tokenizer, tokens and metadata are written
    vocab_size: int = 4096                 # BPE vocabulary trained on the corpus (<= 2^20: the trainer preallocates
                                           # per entry); larger vocabularies come as pre-tokenized data
    val_fraction: float = 0.05             # documents held out for validation
    max_bytes: int = 8_000_000             # cap on corpus bytes read (sorted file order, deterministic)
    dtype: str = "auto"                    # token dtype in .bin: auto | uint16 | uint32
    tokenizer: Optional[str] = None        # Hugging Face tokenizer (a folder with tokenizer.json, or that file):
                                           # used as it is, BOS/EOS from its tokenizer_config.json; null = train a BPE
    text_field: str = "text"               # JSONL / Parquet records: the field holding a document's text
    mix: Optional[list[dict[str, Any]]] = None  # [{path, weight, text_field?}, ...]: sources mixed in these token
                                           # proportions, deterministically (replaces data.path)


@dataclass
class WandbConfig:
    mode: str = "offline"                  # offline | online | disabled (online needs WANDB_API_KEY)
    project: str = "duet"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None


@dataclass
class LoggingConfig:
    console: str = "auto"                  # auto (rich bar on a TTY, plain lines otherwise) | rich | plain | none
    log_interval: int = 1                  # steps between console lines
    dashboard_interval: int = 50           # steps between dashboard images and reports (timeline, expert load,
                                           # optimizer bytes); 0 = off
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Fp8Config:
    enabled: bool = False
    backend: str = "auto"                  # auto (triton on cuda) | torch (exact emulation) | triton
    pow2_scales: bool = False              # power-of-two (ue8m0) scales
    exclude: list[str] = field(default_factory=lambda: ["*embed*", "*lm_head*", "*head*", "*gate", "*router*", "*norm*"])
    dispatch: bool = False                 # FP8 MoE dispatch payload (combine stays high precision, V3 §3.3)


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16            # sequences per optimizer step (all data-parallel ranks together)
    micro_batches: int = 4                 # micro-batches per step per data-parallel rank (pipeline chunks)
    seq_len: int = 128
    seed: int = 1234
    eval_interval: int = 50                # steps between validation passes; 0 = only at the end
    eval_batches: int = 2                  # batches of train.global_batch_size windows per validation pass: the
                                           # same windows for any parallel layout
    checkpoint_interval: int = 100         # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2              # newest K complete checkpoints kept
    memory_check: bool = True              # refuse a run whose estimated memory per rank exceeds what is free
                                           # (framework/footprint.py states the estimate)
    max_bad_steps: int = 5                 # abort after this many non-finite steps in a row (each one is skipped)
    resume: str = "auto"                   # auto (newest complete checkpoint in output_dir, if any) | none | <path>
    resume_allow_data_change: bool = False  # resume even if the prepared data or tokenizer differs from the checkpoint's
    output_dir: str = "outputs/${run_id}"  # run folder shared by all ranks
    device: str = "auto"                   # auto | cpu | cuda
    dtype: str = "float32"                 # float32 | bfloat16 | bf16_emulated (fp32 weights, linears with bf16-rounded
                                           # operands: bf16 GEMM numerics at fp32 speed on CPU, the FP8 baseline)


@dataclass
class ClusterConfig:
    """The machines a run is planned for (python -m launch.plan; framework/plan/)."""
    gpu: str = "cpu"                       # device model: h800 | h100 | h200 | a100 | cpu (measured at start-up)
    gpus: int = 2                          # devices in the job (processes, on cpu)
    gpus_per_node: Optional[int] = None    # null = the device model's (8 for GPUs; one node for cpu)
    memory_gb: Optional[float] = None      # usable memory per device, GB; null = the device model's
    schedules: list[str] = field(default_factory=lambda: ["dualpipe", "dualpipev", "zb1p", "1f1b"])
    micro_batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])  # sequences per micro-batch to try
    train_tokens: float = 0.0              # tokens of the whole run, for its GPU-hours; 0 = per trillion only
    top: int = 10                          # layouts shown
    out_dir: str = "outputs/plan"          # where the chosen layout's config, Gantt chart and table go


@dataclass
class Config:
    run_id: str = MISSING                  # set from conf/config.yaml: the launcher's job id
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


SCHEDULES = ("dualpipe", "dualpipev", "1f1b", "zb1p", "gpipe")
# The tokenizers BPE trainer allocates ~66 bytes per vocabulary entry before it starts (2^28 asked for 17.7 GB and
# aborted the process); real vocabularies stay below 2^18 (V3: 129280).
MAX_TRAINED_VOCAB = 2**20


def register_configs() -> None:
    """Register the schema so Hydra type-checks conf/*.yaml and command-line overrides against it."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="duet_schema", node=Config)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r}: {allowed}")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(key, value, f"allowed: {', '.join(map(str, choices))}")


def _positive(key: str, value: Any, zero_ok: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):   # inf passes a range check, and nan every comparison
        _fail(key, value, "must be a finite number " + (">= 0" if zero_ok else "> 0"))
    if value is None or value < 0 or (value == 0 and not zero_ok):
        _fail(key, value, "must be >= 0" if zero_ok else "must be > 0")


def _fraction(key: str, value: float, closed: bool = True) -> None:
    if not (0.0 <= value <= 1.0) or (not closed and value in (0.0, 1.0)):
        _fail(key, value, "must be in [0, 1]" if closed else "must be in (0, 1)")


ROPE_SCALING_KEYS = ("type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                     "mscale", "mscale_all_dim", "attention_factor", "truncate")


def _closest(word: str, choices) -> str:
    """' (did you mean X?)' when a choice is close to the misspelt word, else ''."""
    import difflib

    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {near[0]}?)" if near else ""


def _number_dict(key: str, spec, allowed: tuple, strings: tuple = ()) -> None:
    """A dict-valued option: null, or a dict of known keys whose numbers are finite."""
    if spec is None:
        return
    if not isinstance(spec, (dict, DictConfig)):
        _fail(key, spec, f"must be null or a dict with keys from: {', '.join(allowed)}")
    for k, v in spec.items():
        if k not in allowed:
            _fail(f"{key}.{k}", v, f"unknown key{_closest(k, allowed)}; allowed: {', '.join(allowed)}")
        if k in strings or isinstance(v, bool):
            continue
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            _fail(f"{key}.{k}", v, "must be a finite number")


def validate_model(m: ModelConfig) -> None:
    _choice("model.name", m.name, ("dense", "deepseek_v3"))
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings"):
        _positive(f"model.{k}", getattr(m, k))
    _positive("model.rms_norm_eps", m.rms_norm_eps)
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.initializer_range", m.initializer_range)
    _number_dict("model.rope_scaling", m.rope_scaling, ROPE_SCALING_KEYS, strings=("type", "rope_type"))
    if m.rope_scaling:
        kind = m.rope_scaling.get("type", m.rope_scaling.get("rope_type", "default"))
        _choice("model.rope_scaling.type", kind, ("yarn", "default"))
        if kind == "yarn" and "original_max_position_embeddings" not in m.rope_scaling:
            _fail("model.rope_scaling", dict(m.rope_scaling), "yarn needs original_max_position_embeddings (the "
                  "pre-training length)")
    if m.name == "dense" and m.hidden_size % m.num_attention_heads:
        _fail("model.num_attention_heads", m.num_attention_heads, f"must divide model.hidden_size={m.hidden_size}")
    if m.name == "dense" and (m.hidden_size // m.num_attention_heads) % 2:
        _fail("model.hidden_size", m.hidden_size, "head dim hidden_size/num_attention_heads must be even for RoPE")
    if m.name != "deepseek_v3":
        return
    _choice("model.scoring_func", m.scoring_func, ("sigmoid", "softmax"))
    _choice("model.topk_method", m.topk_method, ("noaux_tc", "greedy"))
    _choice("model.expert_impl", m.expert_impl, ("grouped", "loop"))
    _choice("model.attn_impl", m.attn_impl, ("naive", "absorb"))
    if m.q_lora_rank is not None:
        _positive("model.q_lora_rank", m.q_lora_rank)
    for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "moe_intermediate_size",
              "moe_layer_freq", "n_group", "topk_group", "routed_scaling_factor"):
        _positive(f"model.{k}", getattr(m, k))
    if m.qk_rope_head_dim % 2:
        _fail("model.qk_rope_head_dim", m.qk_rope_head_dim, "must be even (rotary pairs)")
    _positive("model.n_routed_experts", m.n_routed_experts)
    _positive("model.n_shared_experts", m.n_shared_experts, zero_ok=True)
    if not 1 <= m.num_experts_per_tok <= m.n_routed_experts:
        _fail("model.num_experts_per_tok", m.num_experts_per_tok, f"must be in [1, n_routed_experts={m.n_routed_experts}]")
    if not 0 <= m.first_k_dense_replace <= m.num_hidden_layers:
        _fail("model.first_k_dense_replace", m.first_k_dense_replace, f"must be in [0, num_hidden_layers={m.num_hidden_layers}]")
    if m.n_routed_experts % m.n_group:
        _fail("model.n_group", m.n_group, f"must divide n_routed_experts={m.n_routed_experts}")
    if m.topk_group > m.n_group:
        _fail("model.topk_group", m.topk_group, f"must be <= n_group={m.n_group}")
    if m.n_group > 1 and m.topk_group * (m.n_routed_experts // m.n_group) < m.num_experts_per_tok:
        _fail("model.topk_group", m.topk_group, "topk_group groups must hold at least num_experts_per_tok experts")
    _positive("model.bias_update_rate", m.bias_update_rate, zero_ok=True)
    _fraction("model.bias_update_stop_fraction", m.bias_update_stop_fraction)
    _positive("model.seq_aux_loss_alpha", m.seq_aux_loss_alpha, zero_ok=True)
    _positive("model.aux_loss_alpha", m.aux_loss_alpha, zero_ok=True)
    _positive("model.num_nextn_predict_layers", m.num_nextn_predict_layers, zero_ok=True)
    _fraction("model.mtp_weight_switch_fraction", m.mtp_weight_switch_fraction)
    _positive("model.mtp_loss_weight", m.mtp_loss_weight, zero_ok=True)
    _positive("model.mtp_loss_weight_late", m.mtp_loss_weight_late, zero_ok=True)


def validate_data(d: DataConfig) -> None:
    """The data group alone (launch.prepare_data checks it before the tokenizer trainer runs)."""
    if not 259 <= d.vocab_size <= MAX_TRAINED_VOCAB:
        _fail("data.vocab_size", d.vocab_size, f"must be in [259, 2^20={MAX_TRAINED_VOCAB}] (byte-level BPE needs 256 "
              "bytes + specials; its trainer allocates per entry up front); for a larger vocabulary bring "
              "pre-tokenized data (data.path=<folder with train.bin>) and set model.vocab_size")
    _fraction("data.val_fraction", d.val_fraction, closed=False)
    _positive("data.max_bytes", d.max_bytes)
    _choice("data.dtype", d.dtype, ("auto", "uint16", "uint32"))


def validate(cfg: Config | DictConfig, world_size: int = 1) -> None:
    """Range and combination checks. Raises ConfigError naming the key; call before any process group starts."""
    m, p, o, d, lg, f, t = cfg.model, cfg.parallel, cfg.optim, cfg.data, cfg.logging, cfg.fp8, cfg.train
    validate_model(m)
    # parallel
    _positive("parallel.pp", p.pp)
    _positive("parallel.ep", p.ep)
    _choice("parallel.schedule", p.schedule, SCHEDULES)
    _choice("parallel.backend", p.backend, ("auto", "gloo", "nccl"))
    _choice("parallel.comm.dispatch", p.comm.dispatch, ("counts", "padded"))
    _positive("parallel.timeout_s", p.timeout_s)
    _positive("parallel.comm.sm_budget", p.comm.sm_budget)
    _number_dict("parallel.comm.emulate_link", p.comm.emulate_link, ("latency_us", "gbps"))
    for k, v in (p.comm.emulate_link or {}).items():
        _positive(f"parallel.comm.emulate_link.{k}", v, zero_ok=True)
    if world_size % p.pp:
        _fail("parallel.pp", p.pp, f"must divide the world size {world_size}")
    dp = p.dp if p.dp is not None else world_size // p.pp
    _positive("parallel.dp", dp)
    if p.pp * dp != world_size:
        _fail("parallel.dp", p.dp, f"parallel.pp * parallel.dp must equal the world size {world_size} (pp={p.pp})")
    if dp % p.ep:
        _fail("parallel.ep", p.ep, f"must divide parallel.dp={dp}")
    if p.ep > 1 and m.name == "deepseek_v3" and m.n_routed_experts % p.ep:
        _fail("parallel.ep", p.ep, f"must divide model.n_routed_experts={m.n_routed_experts}")
    if p.ep > 1 and m.name != "deepseek_v3":
        _fail("parallel.ep", p.ep, f"expert parallelism needs an MoE model (model.name={m.name})")
    if p.recompute and p.pp == 1:
        _fail("parallel.recompute", p.recompute, "recomputation runs in pipeline stages: needs parallel.pp > 1")
    if p.schedule == "dualpipe" and p.pp > 1 and p.pp % 2:
        _fail("parallel.pp", p.pp, "dualpipe needs an even number of pipeline stages (use dualpipev for odd pp)")
    if p.pp > 1:
        from schedules.registry import check_args

        try:
            check_args(p.schedule, p.pp, t.micro_batches)
        except ValueError as e:
            _fail("train.micro_batches", t.micro_batches, f"{p.schedule} with pp={p.pp}: {e}")
        parts = 2 * p.pp if p.schedule == "dualpipev" else p.pp
        if m.num_hidden_layers < parts:
            _fail("model.num_hidden_layers", m.num_hidden_layers, f"must be >= the {parts} pipeline parts of {p.schedule}")
        if p.layers_per_part is not None and (len(p.layers_per_part) != parts or sum(p.layers_per_part) != m.num_hidden_layers
                                              or min(p.layers_per_part) < 1):
            _fail("parallel.layers_per_part", list(p.layers_per_part),
                  f"needs {parts} entries >= 1 summing to model.num_hidden_layers={m.num_hidden_layers}")
        if m.name == "deepseek_v3" and m.num_nextn_predict_layers > 0 and p.schedule not in ("dualpipe", "dualpipev"):
            _fail("parallel.schedule", p.schedule, "multi-token prediction shares the embedding with the last stage: "
                  "with pp > 1 use dualpipe or dualpipev (they hold the first and last parts on one rank), "
                  "or set model.num_nextn_predict_layers=0")
    # optim
    _positive("optim.lr", o.lr)
    _fraction("optim.min_lr_ratio", o.min_lr_ratio)
    _fraction("optim.beta1", o.beta1, closed=False) if o.beta1 != 0 else None
    _fraction("optim.beta2", o.beta2, closed=False)
    _positive("optim.eps", o.eps)
    _positive("optim.weight_decay", o.weight_decay, zero_ok=True)
    _choice("optim.schedule", o.schedule, ("cosine", "wsd", "constant"))
    _positive("optim.warmup_steps", o.warmup_steps, zero_ok=True)
    _fraction("optim.decay_fraction", o.decay_fraction)
    _positive("optim.grad_clip", o.grad_clip, zero_ok=True)
    _choice("optim.state.exp_avg", o.state.exp_avg, ("fp32", "bf16", "fp8"))
    _choice("optim.state.exp_avg_sq", o.state.exp_avg_sq, ("fp32", "bf16", "fp8"))
    from framework.data.sources import validate_sources

    validate_sources(d, m)
    validate_data(d)
    # a given tokenizer's own vocabulary is checked against the model once it is read
    if d.tokenizer is None and m.vocab_size < d.vocab_size:
        _fail("model.vocab_size", m.vocab_size, f"must be >= data.vocab_size={d.vocab_size}")
    # logging
    _choice("logging.console", lg.console, ("auto", "rich", "plain", "none"))
    _positive("logging.log_interval", lg.log_interval)
    _positive("logging.dashboard_interval", lg.dashboard_interval, zero_ok=True)
    _choice("logging.wandb.mode", lg.wandb.mode, ("offline", "online", "disabled"))
    # fp8
    _choice("fp8.backend", f.backend, ("auto", "torch", "triton"))
    # train
    for k in ("steps", "global_batch_size", "micro_batches", "seq_len", "eval_batches"):
        _positive(f"train.{k}", getattr(t, k))
    for k in ("eval_interval", "checkpoint_interval"):
        _positive(f"train.{k}", getattr(t, k), zero_ok=True)
    _positive("train.keep_checkpoints", t.keep_checkpoints)
    _positive("train.max_bad_steps", t.max_bad_steps)
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _choice("train.dtype", t.dtype, ("float32", "bfloat16", "bf16_emulated"))
    if f.enabled and t.dtype == "bf16_emulated":
        _fail("train.dtype", t.dtype, "fp8.enabled=true already sets the linears' precision; use float32 or bfloat16")
    from framework.rl.config import validate_rl

    validate_rl(cfg.rl)
    if t.global_batch_size % (dp * t.micro_batches):
        _fail("train.global_batch_size", t.global_batch_size,
              f"must be a multiple of parallel.dp * train.micro_batches = {dp} * {t.micro_batches}")
    if t.seq_len > m.max_position_embeddings:
        _fail("train.seq_len", t.seq_len, f"must be <= model.max_position_embeddings={m.max_position_embeddings}")


def to_container(cfg: Config | DictConfig) -> dict:
    """Plain dict of the resolved config (for logs, wandb and checkpoints)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

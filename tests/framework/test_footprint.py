"""The memory estimate: parameters counted without allocating them, bytes per parameter as V3 §3.3.3 counts them."""
import pytest
import torch
from omegaconf import OmegaConf

from framework.footprint import check_fits, count_parameters, estimate
from tests.conftest import compose_cfg

TINY = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
        "model.intermediate_size=64", "data.vocab_size=512", "train.seq_len=32", "train.global_batch_size=8",
        "train.micro_batches=2"]


@pytest.mark.parametrize("model", ["dense", "deepseek_v3_tiny"])
def test_parameters_are_counted_on_the_meta_device(model):
    from framework.models import build_model

    cfg = compose_cfg(f"model={model}", *TINY)
    total, experts = count_parameters(cfg.model)
    real = build_model(OmegaConf.to_object(cfg.model))
    assert total == sum(p.numel() for p in real.parameters())
    routed = sum(p.numel() for n, p in real.named_parameters() if ".experts." in n and "shared" not in n)
    assert experts == routed and (experts > 0) == (model != "dense")


@pytest.mark.parametrize("overrides, per_param", [
    ([], 16.0),                                                                   # fp32 AdamW: 4 + 4 + 4 + 4
    (["train.dtype=bfloat16", "optim.state.exp_avg=bf16", "optim.state.exp_avg_sq=bf16"], 12.0),   # V3 §3.3.3
    (["optim.state.exp_avg=fp8", "optim.state.exp_avg_sq=fp8"], 8 + 2 * (1 + 8 / 128)),
    (["optim.zero=true", "parallel.dp=2"], 8 + 8 / 2),                            # ZeRO-1 shards the moments
])
def test_bytes_per_parameter(overrides, per_param):
    cfg = compose_cfg("model=dense", *TINY, *overrides)
    f = estimate(cfg, world_size=cfg.parallel.dp or 1)
    total, _ = count_parameters(cfg.model)
    assert f.params == total and f.state_bytes == pytest.approx(per_param * total, rel=1e-12)


def test_experts_split_over_ep_layers_over_pp_and_activations_per_token():
    cfg = compose_cfg("model=deepseek_v3_tiny", *TINY, "model.num_nextn_predict_layers=0", "parallel.dp=2",
                      "parallel.ep=2")
    total, experts = count_parameters(cfg.model)
    assert estimate(cfg, 2).params == total - experts / 2
    dense = compose_cfg("model=dense", *TINY, "parallel=1f1b", "train.micro_batches=4")
    f = estimate(dense, 2)
    tokens = 8 // 4 * 32                                           # one micro-batch of 2 sequences of 32
    assert f.in_flight == 3 and f.tokens == tokens                 # 1F1B on 2 stages keeps up to pp + 1
    per_token_layer = (34 * 32 + 5 * 2 * 32) * 2                   # Korthikanti et al., float32 = 2x the 2-byte figure
    assert f.layer_bytes == 3 * tokens * per_token_layer * 2 / 2   # 2 layers over 2 stages
    assert f.logit_bytes == 3 * tokens * 12 * 512


def test_fits_returns_the_estimate_and_refuses_only_above_the_limit():
    cfg = compose_cfg("model=dense", *TINY)
    f = check_fits(cfg, 1, available=1e12)
    assert f.total < 1e9 and check_fits(cfg, 1, available=f.total).total == f.total
    with pytest.raises(ValueError, match=r"^train.global_batch_size=8 x train.seq_len=32 \(128 tokens per micro-batch\) "
                                         r"does not fit in memory: about 2.36 MB per rank"):
        check_fits(cfg, 1, available=f.total * 0.99)
    if not torch.cuda.is_available():
        cfg.train.device = "cuda"
        with pytest.raises(ValueError, match=r"^train.device='cuda': no CUDA device is visible"):
            check_fits(cfg, 1)

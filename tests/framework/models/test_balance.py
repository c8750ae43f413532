"""Load balancing: the bias rule drives MaxVio down, the metrics and both balance losses follow their formulas."""
from __future__ import annotations

import torch

from framework.config import ModelConfig
from framework.models.deepseek_v3 import DeepSeekV3
from framework.models.capabilities import max_vio
from framework.models.deepseek_v3.balance import (bias_update_rate, collect_aux_loss, expert_loads, reset_loads,
                                                  update_biases)
from framework.models.deepseek_v3.moe import MoE, Router


def cfg_(**kw) -> ModelConfig:
    base = dict(name="deepseek_v3", vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=32, q_lora_rank=None, kv_lora_rank=8,
                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, n_routed_experts=16, num_experts_per_tok=4,
                moe_intermediate_size=8, first_k_dense_replace=1, n_group=4, topk_group=2,
                num_nextn_predict_layers=1, initializer_range=0.2, expert_impl="loop")
    base.update(kw)
    return ModelConfig(**base)


def test_max_vio_and_bias_update_formulas():
    loads = torch.tensor([[1.0, 1, 1, 1], [4, 0, 0, 0], [0, 0, 0, 0], [3, 1, 2, 2]])
    assert max_vio(loads).tolist() == [0.0, 3.0, 0.0, 0.5]
    model = torch.nn.ModuleList(Router(cfg_(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2))
                                for _ in range(4))
    update_biases(model, loads, 0.01)
    for r, row in zip(model, loads):
        want = 0.01 * torch.sign(row.mean() - row)                          # overloaded down, underloaded up
        assert torch.equal(r.e_score_correction_bias, want)
    c = cfg_(bias_update_rate=1e-3, bias_update_stop_fraction=0.9)
    assert bias_update_rate(c, 50, 100) == 1e-3 and bias_update_rate(c, 95, 100) == 0.0


def test_bias_update_balances_a_skewed_router():
    """Experts aligned with the inputs' mean direction win most tokens; the sign rule alone evens the load."""
    torch.manual_seed(0)
    r = Router(cfg_())
    torch.nn.init.normal_(r.weight, std=0.3)
    direction = torch.randn(16)
    with torch.no_grad():
        r.weight += torch.linspace(-0.5, 0.5, 16)[:, None] * direction / direction.norm()
    model = torch.nn.Sequential(r)
    x = torch.randn(1024, 16) * 0.5 + direction
    history = []
    gate_before = r.weight.detach().clone()
    for _ in range(400):
        reset_loads(model)
        r(x)
        loads = expert_loads(model)
        assert loads.shape == (1, 16) and loads.sum() == 1024 * 4
        history.append(max_vio(loads).item())
        update_biases(model, loads, 2e-3)
    assert history[0] > 1.0
    assert max(history[-100:]) < 0.2
    # only the bias moved; the gate's weight is the optimizer's business
    assert torch.equal(r.weight, gate_before) and r.e_score_correction_bias.abs().max() > 0.1


def test_sequence_and_batch_balance_losses_match_their_formulas():
    torch.manual_seed(0)
    cfg = cfg_(seq_aux_loss_alpha=0.01, aux_loss_alpha=0.02)
    moe = MoE(cfg).double().train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    B, T, E, K = 3, 7, 16, 4
    x = torch.randn(B, T, 16, dtype=torch.float64)
    moe(x)
    got = moe.aux_loss
    idx, _, s = moe.gate.route(x.view(B * T, 16))
    s_norm = s / s.sum(-1, keepdim=True)
    seq = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        for i in range(E):
            f = E / (K * T) * sum(int(i in idx[t].tolist()) for t in rows)
            P = sum(s_norm[t, i].item() for t in rows) / T
            seq += f * P
    batch = 0.0
    for i in range(E):
        f = E / (K * B * T) * int((idx == i).sum())
        batch += f * s_norm[:, i].mean().item()
    assert abs(got.item() - (0.01 * seq / B + 0.02 * batch)) < 1e-12
    # the loss trains the gate through the affinities P (f is a count)
    got.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    # eval mode computes none
    moe.eval()
    moe.aux_loss = None
    moe(x)
    assert moe.aux_loss is None


def test_model_loads_and_balance_loss_in_compute_loss():
    torch.manual_seed(0)
    model = DeepSeekV3(cfg_(seq_aux_loss_alpha=0.001))
    ids = torch.randint(0, 64, (2, 12))
    labels = torch.roll(ids, -1, 1)
    reset_loads(model)
    loss, metrics = model.compute_loss(ids, labels)
    loads = expert_loads(model)                                             # layers 1, 2 and the MTP depth
    assert loads.shape == (3, 16) and loads.sum(1).tolist() == [2 * 12 * 4] * 3
    assert all(m.aux_loss is None for m in model.modules() if isinstance(m, MoE))  # collected by final()
    torch.testing.assert_close(loss, metrics["loss/main"] + model.mtp_lambda * metrics["loss/mtp"]
                               + metrics["loss/balance"], rtol=0, atol=1e-6)
    # the same balance loss, recomputed layer by layer
    model.hidden_states(ids)
    per_layer = collect_aux_loss(model)
    assert per_layer is not None and collect_aux_loss(model) is None
    # forward() (logits only) leaves nothing behind
    model(ids)
    assert collect_aux_loss(model) is None


def test_loads_count_training_forwards_only():
    """router.load counts training forwards (train mode, gradients on); evaluation, no-grad replays, generation and
    sampling leave it as it is, and tally_loads counts any forward apart from it: the same counts as a training
    forward on the same tokens, B*T*K per MoE layer."""
    from framework.models.deepseek_v3.balance import tally_loads
    from framework.models.deepseek_v3.generate import generate
    from framework.rl.sampling import sample

    torch.manual_seed(0)
    cfg = cfg_()
    model = DeepSeekV3(cfg)
    ids = torch.randint(0, 64, (2, 8))
    K, n_main = cfg.num_experts_per_tok, cfg.num_hidden_layers - cfg.first_k_dense_replace

    model.compute_loss(ids, ids)                                       # a training forward, MTP depth included
    trained = expert_loads(model).clone()
    assert trained.sum(-1).tolist() == [2 * 8 * K] * (n_main + 1)

    model.eval()
    model.compute_loss(ids, ids)                                       # eval mode, gradients on
    with torch.no_grad():
        model(ids)
    model.train()
    with torch.no_grad():                                              # train mode, no gradients (a replay)
        model.compute_loss(ids, ids)
    generate(model, ids[:1, :4], max_new_tokens=3)
    sample(model, [[1, 2, 3]], num_samples=2, max_new_tokens=3)
    assert torch.equal(expert_loads(model), trained)
    assert model.training

    with tally_loads([model]) as tallies:
        model.eval()
        with torch.no_grad():
            model.compute_loss(ids, ids)
        model.train()
    assert torch.equal(tallies[0], trained)                            # the same tokens, counted apart
    assert torch.equal(expert_loads(model), trained)
    assert all(r.tally is None for r in model.modules() if isinstance(r, Router))

    model.compute_loss(ids, ids)                                       # training counts again
    assert torch.equal(expert_loads(model), 2 * trained)


def test_evaluate_reports_validation_maxvio_and_keeps_training_loads(corpus_dir, data_cache, tmp_path, monkeypatch):
    """Trainer.evaluate: MaxVio_global over the validation windows (routed counts recorded independently, by
    wrapping Router.route) and the training loads untouched."""
    from framework.trainer import Trainer
    from parallel.mesh import init_mesh
    from tests.conftest import compose_cfg

    cfg = compose_cfg("model=deepseek_v3_tiny", f"data.path={corpus_dir}", f"data.cache_dir={data_cache}",
                      "data.vocab_size=512", "model.hidden_size=16", "model.num_hidden_layers=2",
                      "model.moe_intermediate_size=8", "model.intermediate_size=24", "model.first_k_dense_replace=1",
                      "model.max_position_embeddings=32", "train.seq_len=16", "train.global_batch_size=4",
                      "train.micro_batches=2", "train.eval_batches=2", "train.checkpoint_interval=0",
                      "logging.console=none", "logging.wandb.mode=disabled")
    cfg.train.output_dir = str(tmp_path / "run")
    t = Trainer(cfg, init_mesh(1, 1, 1, "cpu"))
    try:
        x, y = t.val_batches[0]
        t.model.compute_loss(x, y)                                     # a training forward leaves counts
        before = expert_loads(t.model).clone()
        assert before.sum() > 0

        seen: dict[int, torch.Tensor] = {}
        route = Router.route

        def recording(self, x):
            idx, w, s = route(self, x)
            seen[id(self)] = seen.get(id(self), 0) + torch.bincount(idx.flatten(), minlength=self.n_experts)
            return idx, w, s

        monkeypatch.setattr(Router, "route", recording)
        out = t.evaluate()
        monkeypatch.setattr(Router, "route", route)
        assert torch.equal(expert_loads(t.model), before)
        assert t.model.training
        loads = torch.stack([seen[id(m)] for m in t.model.modules() if isinstance(m, Router) and id(m) in seen])
        assert int(loads.sum()) == len(t.val_batches) * x.numel() * cfg.model.num_experts_per_tok * loads.shape[0]
        assert out["val/maxvio_global"] == max_vio(loads).mean().item()
    finally:
        t.metrics.close()
        t.release()

"""Gradient reduction of parallel/data_parallel.py with experts sharded (dp=4, ep=2) vs the full batch in one process.

Every rank computes the mean loss of its own micro-batch; after reduce_gradients its dense gradients must equal
the single-process gradient of the mean loss over all 4 ranks' tokens, and its expert gradients the reference's
gradients of the experts it holds. Runs inside the 4-rank group of test_mesh.py.
"""
import copy

import pytest
import torch
import torch.nn as nn

from tests.parallel.test_mesh import four_rank_results

C, E = 32, 8


class MoENet(nn.Module):
    """A MoE layer and a linear head: enough to have both dense and expert parameters."""

    def __init__(self, cfg):
        super().__init__()
        from framework.models.deepseek_v3.moe import MoE

        self.moe = MoE(cfg)
        self.head = nn.Linear(cfg.hidden_size, 3)

    def forward(self, x):
        return self.head(self.moe(x))


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def data_parallel_checks(mesh) -> dict:
    import torch.distributed as dist

    from framework.models.deepseek_v3.balance import expert_loads, reset_loads, update_biases
    from parallel.data_parallel import average_gradients, grad_norm_sq_share, reduce_gradients
    from framework.models.expert_parallel import apply_expert_parallel
    from tests.parallel.test_expert import moe_cfg

    assert mesh.dp == 4 and mesh.ep == 2
    out = {}
    for tag, dtype, impl in (("fp64", torch.float64, "loop"), ("fp32", torch.float32, "grouped")):
        torch.manual_seed(0)
        ref = MoENet(moe_cfg(expert_impl=impl)).to(dtype)
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(0.0, 0.3)
        net = apply_expert_parallel(copy.deepcopy(ref), mesh)
        g = torch.Generator().manual_seed(9)
        xs = [torch.randn(2, 3, C, generator=g, dtype=dtype) for _ in range(mesh.dp)]
        ts = [torch.randn(2, 3, 3, generator=g, dtype=dtype) for _ in range(mesh.dp)]
        # reference: the mean loss over the global batch, one process
        reset_loads(ref)
        nn.functional.mse_loss(ref(torch.cat(xs)), torch.cat(ts)).backward()
        # data parallel: mean loss of my micro-batch, then the reduction
        r = mesh.dp_rank
        nn.functional.mse_loss(net(xs[r]), ts[r]).backward()
        reduce_gradients(list(net.named_parameters()), mesh)
        ref_params = dict(ref.named_parameters())
        local = net.moe.experts.expert_ids
        dense_err, expert_err, n_expert = 0.0, 0.0, 0
        for name, p in net.named_parameters():
            want = ref_params[name].grad
            if getattr(p, "_duet_expert", False):
                n_expert += 1
                expert_err = max(expert_err, _rel(p.grad, want[local.start:local.stop]))
            else:
                dense_err = max(dense_err, _rel(p.grad, want))
        out[f"{tag}.dense"], out[f"{tag}.expert"], out[f"{tag}.n_expert"] = dense_err, expert_err, n_expert
        # each distinct gradient counted once: the shares sum to the reference's squared norm
        share = grad_norm_sq_share(list(net.named_parameters()), mesh)
        dist.all_reduce(share)
        want_sq = sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters())
        out[f"{tag}.norm_sq"] = abs(float(share) - want_sq) / want_sq
        # aux-loss-free balancing (V3 §2.1.2) on global loads: same bias on every rank, equal to the reference's
        if tag == "fp64":
            total = expert_loads(net).clone()          # the global batch's loads: summed over the dp group
            dist.all_reduce(total, group=mesh.dp_group)
            update_biases(net, total, rate=1e-3)
            update_biases(ref, expert_loads(ref), rate=1e-3)
            bias = net.moe.gate.e_score_correction_bias
            every = [torch.empty_like(bias) for _ in range(mesh.dp)]
            dist.all_gather(every, bias, group=mesh.dp_group)
            out["bias.spread"] = max(float((b - bias).abs().max()) for b in every)
            out["bias.vs_reference"] = float((bias - ref.moe.gate.e_score_correction_bias).abs().max())
            out["bias.moved"] = float(bias.abs().max())
            out["loads.vs_reference"] = float((total - expert_loads(ref)).abs().max())
    # average_gradients still averages over a group, across dtypes (separate buckets)
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    a.grad = torch.full((3,), float(mesh.dp_rank + 1))
    b.grad = torch.full((2,), float(10 * mesh.dp_rank), dtype=torch.float64)
    average_gradients([a, b], mesh.dp_group)
    out["average_gradients"] = a.grad.tolist() + b.grad.tolist()
    return out


@pytest.mark.parametrize("tag,tol", [("fp64", 1e-12), ("fp32", 1e-6)])
def test_reduce_gradients_equals_full_batch_gradient(tag, tol):
    for rank, res in enumerate(four_rank_results()):
        assert res[f"{tag}.n_expert"] == 2
        assert res[f"{tag}.dense"] <= tol, (rank, res[f"{tag}.dense"])
        assert res[f"{tag}.expert"] <= tol, (rank, res[f"{tag}.expert"])
        assert res[f"{tag}.norm_sq"] <= tol, (rank, res[f"{tag}.norm_sq"])


def test_bias_update_sees_global_loads():
    for res in four_rank_results():
        assert res["loads.vs_reference"] == 0.0
        assert res["bias.spread"] == 0.0
        assert res["bias.vs_reference"] == 0.0
        assert res["bias.moved"] == pytest.approx(1e-3)


def test_average_gradients_keeps_working():
    for res in four_rank_results():
        assert res["average_gradients"] == [2.5, 2.5, 2.5, 15.0, 15.0]


def test_reduction_groups_split_dense_and_expert():
    from types import SimpleNamespace

    from parallel.data_parallel import reduction_groups

    dense, expert = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    expert._duet_expert = True
    mesh = SimpleNamespace(dp_group="DP", edp_group="EDP")
    groups = reduction_groups([("d", dense), ("e", expert)], mesh)
    assert groups["dense"][0] == "DP" and [n for n, _ in groups["dense"][1]] == ["d"]
    assert groups["expert"][0] == "EDP" and [n for n, _ in groups["expert"][1]] == ["e"]
